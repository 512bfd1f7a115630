"""target_outbox: each extra publication target's own state of the outbox rows

An outbox row with no target_outbox row for a target is due there (directory_sync/targets.py), so
existing rows are published to a target added later, and nothing written before this revision is lost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 23:30:00
"""
from alembic import op
import sqlalchemy as sa

import registration_app.store.models


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'target_outbox',
        sa.Column('target', sa.String(length=64), nullable=False),
        sa.Column('outbox_id', sa.Integer(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', registration_app.store.models.UTCDateTime(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('done_at', registration_app.store.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('target', 'outbox_id'),
    )


def downgrade() -> None:
    op.drop_table('target_outbox')
