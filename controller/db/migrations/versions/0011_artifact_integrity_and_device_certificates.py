"""artifact integrity marks and device certificates

Revision ID: 0011
Revises: 0006
Create Date: 2026-12-07 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op


import controller.db.types

revision = '0011'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_certificate',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('cert_pem', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('not_before', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('not_after', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('issued_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('via', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('revoked_at', controller.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoke_reason', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('serial')
    )
    with op.batch_alter_table('device_certificate', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_certificate_device_id'), ['device_id'], unique=False)

    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.add_column(sa.Column('corrupt_at', controller.db.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('corrupt_reason', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.drop_column('corrupt_reason')
        batch_op.drop_column('corrupt_at')

    with op.batch_alter_table('device_certificate', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_certificate_device_id'))

    op.drop_table('device_certificate')
