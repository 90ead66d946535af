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
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.add_column(sa.Column('corrupt_at', controller.db.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('corrupt_reason', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.drop_column('corrupt_reason')
        batch_op.drop_column('corrupt_at')
