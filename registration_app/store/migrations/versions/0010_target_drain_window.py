"""target_progress and ix_target_outbox_due: a target's drain reads only the rows due there

A drain round read every outbox row joined with the target's state of it (an outbox row without a state
row is due there), so each round cost the whole outbox. Now it reads the target's rows tried and not done
through ix_target_outbox_due, and the outbox rows above `target_progress.seen_through` (every row up to
it has a state row at the target) that have none.

No progress row yet means 0: a database migrated to this revision starts by reading its outbox once per
target, and the progress moves on from there; nothing is lost.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 05:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_target_outbox_due', 'target_outbox', ['target', 'done_at', 'next_attempt_at'])
    op.create_table(
        'target_progress',
        sa.Column('target', sa.String(length=64), nullable=False),
        sa.Column('seen_through', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('target'),
    )


def downgrade() -> None:
    op.drop_table('target_progress')
    op.drop_index('ix_target_outbox_due', table_name='target_outbox')
