"""secrets out of the database: sealed enrollment-code keys, bootstrap failure counters, a keyed audit head

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 20:00:00

The keys themselves live in files of the data folder (README, Server secrets); this revision only adds
what the database keeps about them. Existing rows are brought under the keys by `autoenroll init`
(store/upgrade.py `adopt_server_keys`), which has the keys: a migration has only the database URL.
An existing audit chain is marked unkeyed here (keyed = 0) until then.
"""
from alembic import op
import sqlalchemy as sa

from registration_app.store.models import UTCDateTime


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('enrollment_codes') as batch:
        # 0: mac_key is the MAC key itself (before 0005); 1: sealed under the server's code key
        batch.add_column(sa.Column('key_version', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('failures', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('burnt_at', UTCDateTime(), nullable=True))
    with op.batch_alter_table('audit_head') as batch:
        batch.add_column(sa.Column('rows', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('keyed', sa.Integer(), nullable=False, server_default='0'))
    op.execute("UPDATE audit_head SET rows = (SELECT count(*) FROM audit)")
    op.create_table('bootstrap_failures',
                    sa.Column('scope', sa.String(length=96), nullable=False),
                    sa.Column('window_started_at', UTCDateTime(), nullable=False),
                    sa.Column('failures', sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint('scope'))


def downgrade() -> None:
    op.drop_table('bootstrap_failures')
    with op.batch_alter_table('audit_head') as batch:
        batch.drop_column('keyed')
        batch.drop_column('rows')
    with op.batch_alter_table('enrollment_codes') as batch:
        batch.drop_column('burnt_at')
        batch.drop_column('failures')
        batch.drop_column('key_version')
