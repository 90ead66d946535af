"""fleet health rollups, device trouble, webhooks with their events and delivery log

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-07 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op


import controller.db.types

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_health',
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('last_error_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.PrimaryKeyConstraint('device_id')
    )
    op.create_index(op.f('ix_device_health_last_error_at'), 'device_health', ['last_error_at'], unique=False)
    op.create_table('device_offline_notice',
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('offline_since', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('notified_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('device_id')
    )
    op.create_table('health_cursor',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('last_id', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('health_rollup',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('resolution_s', sa.Integer(), nullable=False),
    sa.Column('bucket_start', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model_version', sa.Integer(), nullable=False),
    sa.Column('variant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reports', sa.Integer(), nullable=False),
    sa.Column('inferences', sa.BigInteger(), nullable=False),
    sa.Column('errors', sa.BigInteger(), nullable=False),
    sa.Column('drops', sa.BigInteger(), nullable=False),
    sa.Column('latency', sa.JSON(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('scores', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model', 'model_version', 'resolution_s', 'bucket_start', 'variant', name='uq_health_rollup_bucket')
    )
    op.create_index('ix_health_rollup_recent', 'health_rollup', ['resolution_s', 'bucket_start'], unique=False)
    # the health job's cursors exist from the start, so two jobs serialize on their rows (never both insert one)
    op.bulk_insert(
        sa.table('health_cursor', sa.column('name', sa.String), sa.column('last_id', sa.BigInteger)),
        [{'name': 'telemetry', 'last_id': 0}, {'name': 'events', 'last_id': 0}],
    )
    op.create_table('notification_event',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_notification_event_created_at'), 'notification_event', ['created_at'], unique=False)
    op.create_index(op.f('ix_notification_event_type'), 'notification_event', ['type'], unique=False)
    op.create_table('webhook',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('events', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('created_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('updated_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('webhook_delivery',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('webhook_id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=40), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', controller.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_attempt_at', controller.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('delivered_at', controller.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['event_id'], ['notification_event.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['webhook_id'], ['webhook.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_webhook_delivery_due', 'webhook_delivery', ['status', 'next_attempt_at'], unique=False)
    op.create_index(op.f('ix_webhook_delivery_webhook_id'), 'webhook_delivery', ['webhook_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_webhook_delivery_webhook_id'), table_name='webhook_delivery')
    op.drop_index('ix_webhook_delivery_due', table_name='webhook_delivery')
    op.drop_table('webhook_delivery')
    op.drop_table('webhook')
    op.drop_index(op.f('ix_notification_event_type'), table_name='notification_event')
    op.drop_index(op.f('ix_notification_event_created_at'), table_name='notification_event')
    op.drop_table('notification_event')
    op.drop_index('ix_health_rollup_recent', table_name='health_rollup')
    op.drop_table('health_rollup')
    op.drop_table('health_cursor')
    op.drop_table('device_offline_notice')
    op.drop_index(op.f('ix_device_health_last_error_at'), table_name='device_health')
    op.drop_table('device_health')
