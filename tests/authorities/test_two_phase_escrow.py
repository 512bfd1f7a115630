"""The split deployment's two-phase escrow at the KRA (authorities/kra.py), on a real migrated database
with a real CA recording certificates in it: a pending escrow is never recovered; the sweep confirms one
whose certificate the CA recorded and voids (keeps, marks, audits) one whose certificate never came once
the grace is over; a withdrawal never gives up the key of a certificate that exists."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from registration_app.authorities.ca import LocalCA, serial_hex
from registration_app.authorities.certs import random_serial
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.kra import PENDING_GRACE, LocalKRA
from registration_app.core.errors import Conflict, UnknownCertificate
from registration_app.core.model import KeyType, RecoveryGrant, Subject
from registration_app.settings import Settings
from registration_app.store.models import AuditEvent, Escrow
from tests.authorities.conftest import NOW, URLS
from tests.databases import bare_database

EMAIL = "pending@example.org"
OWNER = RecoveryGrant(kind="owner", email=EMAIL, actor=EMAIL)


@pytest.fixture
def authorities(tmp_path, ec_ca):
    storage = generate_private_key(KeyType.RSA_2048)
    with bare_database(tmp_path) as db:
        yield LocalCA(db, ec_ca.cert, ec_ca.key, URLS), LocalKRA(db, storage.public_key(), lambda: storage), db


PROFILE = Settings().profiles["smime-encryption-ec"]


def escrow_pending(kra: LocalKRA, now=NOW):
    """A key escrowed pending (the first phase), for a serial the key authority chose."""
    key, serial = generate_private_key(KeyType.EC_P256), random_serial()
    kra.escrow_pending(serial_hex(serial), key, email=EMAIL, profile=PROFILE.name, actor="ra", now=now)
    return key, serial


def sign(ca: LocalCA, key, serial: int) -> None:
    ca.sign(key.public_key(), PROFILE, Subject(email=EMAIL, common_name=None), user_dn="uid=p,dc=example,dc=org",
            serial=serial, replaces=None, key_source="server", actor="ra", now=NOW)


def state_of(db, serial: int) -> str:
    with db.read() as session:
        return session.execute(select(Escrow.state).where(Escrow.serial == serial_hex(serial))).scalar_one()


def events_of(db, serial: int) -> list[str]:
    with db.read() as session:
        rows = session.execute(select(AuditEvent.event, AuditEvent.detail).order_by(AuditEvent.id)).all()
    return [event for event, detail in rows if (detail or {}).get("serial") == serial_hex(serial)]


def test_a_pending_escrow_is_never_recovered_until_its_certificate_is_recorded(authorities):
    ca, kra, db = authorities
    key, serial = escrow_pending(kra)
    with pytest.raises(UnknownCertificate):
        kra.recover(serial_hex(serial), OWNER, now=NOW)
    with pytest.raises(Conflict):  # the RA's word is not enough: the CA's records show no certificate
        kra.confirm(serial_hex(serial), actor="ra", now=NOW)
    assert state_of(db, serial) == "pending"

    sign(ca, key, serial)
    recovered = kra.recover(serial_hex(serial), OWNER, now=NOW)  # settled first, then given back
    assert recovered.private_numbers() == key.private_numbers()
    assert state_of(db, serial) == "confirmed"
    assert events_of(db, serial) == ["key.escrow_pending", "certificate.issued", "key.escrowed", "key.recovered"]


def test_the_sweep_confirms_a_signed_pending_escrow_and_voids_an_unsigned_one_after_the_grace(authorities):
    ca, kra, db = authorities
    signed_key, signed = escrow_pending(kra)
    sign(ca, signed_key, signed)  # the RA died between the CA's signature and its confirmation
    _, unsigned = escrow_pending(kra)  # the RA died before the CA signed

    assert kra.sweep(NOW + timedelta(seconds=30)) == {"confirmed": 1, "void": 0}
    assert (state_of(db, signed), state_of(db, unsigned)) == ("confirmed", "pending")  # within the grace

    assert kra.sweep(NOW + PENDING_GRACE + timedelta(seconds=1)) == {"confirmed": 0, "void": 1}
    assert state_of(db, unsigned) == "void"  # kept, marked
    with pytest.raises(UnknownCertificate):
        kra.recover(serial_hex(unsigned), OWNER, now=NOW + PENDING_GRACE)
    assert kra.recover(serial_hex(signed), OWNER, now=NOW) is not None
    assert events_of(db, unsigned) == ["key.escrow_pending", "key.escrow_voided"]
    with db.read() as session:
        voided = session.execute(select(AuditEvent).where(AuditEvent.event == "key.escrow_voided")).scalar_one()
    assert voided.actor == "kra-sweep" and voided.subject == EMAIL and voided.detail["state"] == "void"
    assert kra.sweep(NOW + 2 * PENDING_GRACE) == {"confirmed": 0, "void": 0}  # nothing left to settle


def test_a_withdrawal_voids_only_an_escrow_whose_certificate_does_not_exist(authorities):
    ca, kra, db = authorities
    _, never_signed = escrow_pending(kra)
    assert kra.withdraw(serial_hex(never_signed), actor="ra", reason="the CA failed: key_store_unavailable",
                        now=NOW) == "void"
    withdrawn = events_of(db, never_signed)
    assert withdrawn == ["key.escrow_pending", "key.escrow_withdrawn"]

    key, signed_after_all = escrow_pending(kra)
    sign(ca, key, signed_after_all)  # the CA recorded it, then its answer was lost
    assert kra.withdraw(serial_hex(signed_after_all), actor="ra", reason="the CA failed: internal", now=NOW) == \
        "confirmed"
    assert kra.recover(serial_hex(signed_after_all), OWNER, now=NOW) is not None


def test_a_void_escrow_whose_certificate_turns_up_after_all_is_confirmed_not_lost(authorities):
    ca, kra, db = authorities
    key, serial = escrow_pending(kra)
    kra.sweep(NOW + PENDING_GRACE + timedelta(seconds=1))
    assert state_of(db, serial) == "void"
    sign(ca, key, serial)  # recorded later than any grace allowed for
    assert kra.recover(serial_hex(serial), OWNER, now=NOW).private_numbers() == key.private_numbers()
    assert events_of(db, serial)[-2:] == ["key.escrowed", "key.recovered"]


def test_the_server_platforms_escrow_is_confirmed_at_once(authorities):
    _, kra, db = authorities
    key, serial = generate_private_key(KeyType.EC_P256), random_serial()
    kra.escrow(serial_hex(serial), key, email=EMAIL, profile=PROFILE.name, actor="ra", now=NOW)
    assert state_of(db, serial) == "confirmed"
    assert events_of(db, serial) == ["key.escrowed"]


def test_the_sweep_voids_by_the_configured_grace(tmp_path, ec_ca):
    """LocalKRA's `pending_grace` (settings.escrow_pending_grace_seconds) is the sweep's default grace."""
    storage = generate_private_key(KeyType.RSA_2048)
    with bare_database(tmp_path) as db:
        kra = LocalKRA(db, storage.public_key(), lambda: storage, pending_grace=timedelta(seconds=30))
        _, unsigned = escrow_pending(kra)
        assert kra.sweep(NOW + timedelta(seconds=29)) == {"confirmed": 0, "void": 0}
        assert kra.settle_pending(NOW + timedelta(seconds=31)) == {"confirmed": [], "void": [serial_hex(unsigned)]}
        assert state_of(db, unsigned) == "void"
