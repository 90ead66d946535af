"""forgotten devices stay forgotten

Revision ID: 0012
Revises: 0006
Create Date: 2026-12-07 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op


import controller.db.types

revision = '0012'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('forgotten_device',
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('forgotten_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('forgotten_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('was_enrolled', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('device_id')
    )


def downgrade() -> None:
    op.drop_table('forgotten_device')
