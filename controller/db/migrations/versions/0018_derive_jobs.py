"""derive jobs (distill, prune, finetune) and the lineage and source checkpoint of versions

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 00:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import controller.db.types

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('derive_job',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('model_name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('base_version', sa.Integer(), nullable=False),
    sa.Column('steps', sa.JSON(), nullable=False),
    sa.Column('data_sha256', sa.String(length=64), nullable=True),
    sa.Column('target_model', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('current_step', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.Column('produced', sa.JSON(), nullable=False),
    sa.Column('worker_pid', sa.Integer(), nullable=True),
    sa.Column('replica_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', controller.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('derive_job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_derive_job_model_name'), ['model_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_derive_job_status'), ['status'], unique=False)
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_checkpoint', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lineage', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('derive_job_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('derive_step', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_model_version_derive_job_id'), ['derive_job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_version', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_version_derive_job_id'))
        batch_op.drop_column('derive_step')
        batch_op.drop_column('derive_job_id')
        batch_op.drop_column('lineage')
        batch_op.drop_column('source_checkpoint')
    with op.batch_alter_table('derive_job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_derive_job_status'))
        batch_op.drop_index(batch_op.f('ix_derive_job_model_name'))
    op.drop_table('derive_job')
