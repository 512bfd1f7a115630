"""certificates.encryption_slot: one current encryption certificate per address, decided by the database

A partial unique index over `encryption_slot` (lower(email) on a certificate of an encryption profile
without `coexist`) among valid rows: of two enrollments of two encryption profiles at once, the second to
commit breaks it (409, nothing issued), where the RA's read before the transaction let both through.

Existing rows keep a NULL slot (outside the index), so the migration cannot fail on a user who already
holds two current encryption certificates (from that race, or from before the rule), and changes no
certificate: which profiles have `coexist` is configuration the database does not hold, and superseding a
certificate here would change what users hold without an audit row (the audit chain's key is not in the
database). Such users keep renewing each certificate (a renewal of its own profile keeps its
predecessor's slot); every new certificate and every replacement across profiles takes the slot.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 03:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('certificates', sa.Column('encryption_slot', sa.String(length=320), nullable=True))
    op.create_index('uq_certificates_one_current_encryption', 'certificates', ['encryption_slot'], unique=True,
                    sqlite_where=sa.text("status = 'valid'"), postgresql_where=sa.text("status = 'valid'"))


def downgrade() -> None:
    op.drop_index('uq_certificates_one_current_encryption', table_name='certificates')
    op.drop_column('certificates', 'encryption_slot')
