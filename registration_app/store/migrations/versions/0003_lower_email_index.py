"""an index on lower(email), profile: the enrollment policy's history query

Every enrollment reads the user's history with `lower(email) = ? AND profile = ?`; the index on
`email` cannot serve a case-insensitive match, so without this one the query scanned the whole
certificates table, a cost growing with every certificate issued (PERFORMANCE.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 05:05:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_certificates_lower_email_profile', 'certificates',
                    [sa.text('lower(email)'), 'profile'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_certificates_lower_email_profile', table_name='certificates')
