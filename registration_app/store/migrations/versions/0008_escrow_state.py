"""escrow.state: the two-phase escrow of a split deployment ('pending', 'confirmed', 'void')

Existing rows were written with their certificate (one transaction) or before the CA signed (the split
deployment's escrow-first rule): they stay recoverable, 'confirmed'.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 02:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('escrow', sa.Column('state', sa.String(length=16), nullable=False, server_default='confirmed'))
    op.create_index('ix_escrow_state', 'escrow', ['state'])


def downgrade() -> None:
    op.drop_index('ix_escrow_state', table_name='escrow')
    op.drop_column('escrow', 'state')
