"""drop ix_certificates_email: ix_certificates_user_profile_status (email, profile, status) serves
every lookup by address that it served, and each index of the certificates table is one more B-tree page
written by every issuing transaction (PERFORMANCE.md, "The server's CPU per enrollment, thread by thread")

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 06:10:00
"""
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_certificates_email', table_name='certificates')


def downgrade() -> None:
    op.create_index('ix_certificates_email', 'certificates', ['email'], unique=False)
