"""cluster: leases, replicas, messages for another replica's deployment

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 17:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import controller.db.types

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cluster_lease',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('holder', sa.String(length=128), nullable=False),
    sa.Column('token', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.Double(), nullable=False),
    sa.Column('acquired_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('cluster_replica',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('started_at', sa.Double(), nullable=False),
    sa.Column('heartbeat_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('cluster_message',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('deployment_id', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_cluster_message_deployment', 'cluster_message', ['deployment_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_cluster_message_deployment', table_name='cluster_message')
    op.drop_table('cluster_message')
    op.drop_table('cluster_replica')
    op.drop_table('cluster_lease')
