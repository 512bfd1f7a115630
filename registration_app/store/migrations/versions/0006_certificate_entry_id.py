"""certificates.entry_id: the directory entry's stable identity (entryUUID / objectGUID)

Existing rows stay NULL: the first request or reconcile pass that finds a row's entry at its user_dn
fills it in (first sight), see store/models.py.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01 20:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('certificates', sa.Column('entry_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+): a batch copy would have to reflect the table, and
    # reflection cannot rebuild the expression index ix_certificates_lower_email_profile.
    op.drop_column('certificates', 'entry_id')
