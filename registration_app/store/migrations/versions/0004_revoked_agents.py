"""revoked_agents: the revocation list of user servers' TLS client certificates

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:20:00
"""
from alembic import op
import sqlalchemy as sa

from registration_app.store.models import UTCDateTime


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('revoked_agents',
                    sa.Column('thumbprint', sa.String(length=64), nullable=False),
                    sa.Column('subject', sa.String(length=1024), nullable=False),
                    sa.Column('serial', sa.String(length=48), nullable=False),
                    sa.Column('revoked_at', UTCDateTime(), nullable=False),
                    sa.Column('reason', sa.String(length=256), nullable=False),
                    sa.PrimaryKeyConstraint('thumbprint'))


def downgrade() -> None:
    op.drop_table('revoked_agents')
