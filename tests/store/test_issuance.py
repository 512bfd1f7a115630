"""store/issuance.py and the one-current-encryption index (store/models.py `encryption_slot`): the
database, not the RA's earlier read, keeps one current encryption certificate per address; on SQLite and
on the run's PostgreSQL (`--database=postgresql`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, update

from registration_app.authorities.ca import encryption_slot
from registration_app.core.errors import DuplicateRecord
from registration_app.core.model import Profile, Usage
from registration_app.store.db import migrate
from registration_app.store.errors import lost_renewal_race
from registration_app.store.issuance import insert_issued
from registration_app.store.models import ONE_ENCRYPTION_CONSTRAINT, Certificate
from tests.databases import bare_database

EMAIL = "Slot@Example.org"
NOW = datetime.now(timezone.utc)


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path) as database:
        yield database


def certificate(serial: str, profile: str, *, replaces: str | None = None, slot: str | None = EMAIL.lower(),
                not_after: datetime = NOW + timedelta(days=365)) -> dict:
    return dict(serial=serial, email=EMAIL, user_dn="uid=slot", profile=profile, usage="encryption",
                status="valid", der=b"0", not_before=NOW, not_after=not_after, issued_at=NOW,
                key_source="server", replaces=replaces, renewal_key=f"{profile}|after:{replaces or 'none'}",
                encryption_slot=slot)


def issue(db, cert: dict) -> None:
    """What the CA's record step does: the predecessor superseded, then the row and its outbox row."""
    supersede = [{"old": cert["replaces"], "new": cert["serial"]}] if cert["replaces"] else []
    outbox = [dict(user_dn="uid=slot", email=EMAIL, serial=cert["serial"], reason="issued", created_at=NOW,
                   attempts=0, next_attempt_at=NOW)]
    db.run(lambda conn: insert_issued(conn, [cert], outbox, supersede), core=True)


def rows(db) -> dict[str, tuple[str, str | None]]:
    with db.read() as session:
        found = session.execute(select(Certificate.serial, Certificate.status, Certificate.encryption_slot))
        return {serial: (status, slot) for serial, status, slot in found}


def test_the_slot_is_the_lowercase_address_of_encryption_profiles_without_coexist():
    assert encryption_slot(EMAIL, Profile(name="e", usage=Usage.ENCRYPTION)) == "slot@example.org"
    assert encryption_slot(EMAIL, Profile(name="c", usage=Usage.ENCRYPTION, coexist=True)) is None
    assert encryption_slot(EMAIL, Profile(name="s", usage=Usage.SIGNATURE)) is None


def test_a_second_current_encryption_certificate_of_one_address_is_a_lost_race(db):
    issue(db, certificate("a1", "rsa"))
    with pytest.raises(DuplicateRecord) as second:
        issue(db, certificate("b1", "ec"))
    assert second.value.constraint == ONE_ENCRYPTION_CONSTRAINT and lost_renewal_race(second.value)
    assert rows(db) == {"a1": ("valid", "slot@example.org")}  # nothing of the loser, its supersede undone
    issue(db, certificate("c1", "coexisting", slot=None))  # outside the rule: beside it
    db.run(lambda conn: conn.execute(update(Certificate).where(Certificate.serial == "a1")
                                     .values(status="revoked")), core=True)
    issue(db, certificate("b1", "ec"))  # a revoked certificate holds no slot
    assert rows(db)["b1"] == ("valid", "slot@example.org")


def test_a_replacement_across_profiles_takes_the_slot_its_predecessor_frees(db):
    issue(db, certificate("a1", "rsa"))
    issue(db, certificate("b1", "ec", replaces="a1"))
    assert rows(db) == {"a1": ("superseded", "slot@example.org"), "b1": ("valid", "slot@example.org")}


def test_a_renewal_of_its_own_profile_keeps_its_predecessors_slot(db):
    """A user holding two current encryption certificates from before migration 0009 (one without a slot)
    renews each: the renewal of the one without a slot takes none, the other's keeps its slot."""
    issue(db, certificate("a1", "rsa", slot=None))  # as migration 0009 leaves an existing row
    issue(db, certificate("b1", "ec"))
    issue(db, certificate("a2", "rsa", replaces="a1"))
    issue(db, certificate("b2", "ec", replaces="b1"))
    assert {s: r for s, r in rows(db).items() if r[0] == "valid"} == {"a2": ("valid", None),
                                                                      "b2": ("valid", "slot@example.org")}
    with pytest.raises(DuplicateRecord) as across:  # a replacement across profiles is a new certificate
        issue(db, certificate("b3", "ec", replaces="a2"))
    assert across.value.constraint == ONE_ENCRYPTION_CONSTRAINT


def test_a_database_holding_two_current_encryption_certificates_of_one_address_migrates(tmp_path):
    """Migration 0009 leaves existing rows outside the index (no slot): it cannot fail on them, and
    changes no certificate."""
    from alembic import command
    from alembic.config import Config

    from registration_app.store.db import MIGRATIONS, Database
    with bare_database(tmp_path) as database:
        url = database.url
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.downgrade(config, "0008")
    old = Database(url)
    try:
        with old.engine.begin() as conn:
            for serial, profile in (("a1", "rsa"), ("b1", "ec")):
                values = certificate(serial, profile)
                del values["encryption_slot"]
                conn.execute(insert(Certificate.__table__).values(
                    {Certificate.__table__.c[k]: v for k, v in values.items()}))
    finally:
        old.dispose()
    migrate(url)
    migrated = Database(url)
    try:
        assert {s: r for s, r in rows(migrated).items() if s in ("a1", "b1")} == {"a1": ("valid", None),
                                                                               "b1": ("valid", None)}
        issue(migrated, certificate("b2", "ec", replaces="b1"))  # each renews, and then holds its slot
        issue(migrated, certificate("a2", "rsa", replaces="a1"))
    finally:
        migrated.dispose()
