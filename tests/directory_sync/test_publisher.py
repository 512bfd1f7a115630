"""The outbox worker against a real slapd: user gone, back-off while LDAP is down, CRL freshness,
revocation refused at once."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from directory_sync.ldap import LdapDirectory
from directory_sync.publisher import USER_GONE, Publisher
from directory_sync.slapd import free_port
from registration_app.store.models import AuditEvent, CrlState, Escrow, Outbox
from registration_app.store.repos import outbox_status
from tests.directory_sync.world import add_group, issue, make_services, profiles_for


@pytest.fixture(scope="module")
def group(slapd):
    from tests.ldap_admin import LdapAdmin
    conn = LdapAdmin.for_slapd(slapd)
    dn = add_group(conn, "pub-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    conn.unbind()
    return dn


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    s = make_services(tmp_path_factory.mktemp("publisher"), slapd.settings(), profiles=profiles_for(group))
    yield s
    s.close()


def member(ldap_admin, new_user, group) -> tuple[str, str]:
    dn, email = new_user()
    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
    return dn, email


def test_user_gone_is_marked_done_and_audited_not_retried_forever(services, ldap_admin, new_user, group):
    dn, email = member(ldap_admin, new_user, group)
    issued = issue(services, email)
    assert ldap_admin.delete(dn), ldap_admin.result  # the entry disappears before publication
    assert services.publisher.drain(user_dn=dn) == 1
    with services.db.transaction() as session:
        row = session.execute(select(Outbox).where(Outbox.serial == issued.serial)).scalar_one()
        gone = session.execute(select(AuditEvent).where(AuditEvent.event == "publish.user_gone",
                                                        AuditEvent.subject == email)).scalar_one()
    assert row.done_at is not None and row.last_error == USER_GONE
    assert issued.serial in gone.detail["serials"]
    assert not services.publisher.pending(dn)


def test_ldap_down_backs_off_with_jitter_and_status_shows_depth_and_age(services, ldap_admin, new_user, group):
    dn, email = member(ldap_admin, new_user, group)
    down = LdapDirectory(services.settings.ldap.__class__(url=f"ldap://127.0.0.1:{free_port()}", timeout_seconds=0.5))
    publisher = Publisher(services.db, down, services.settings.profiles, b"")
    issued = issue(services, email)
    now = datetime.now(timezone.utc)
    assert publisher.drain(user_dn=dn, now=now) == 0
    with services.db.transaction() as session:
        row = session.execute(select(Outbox).where(Outbox.serial == issued.serial)).scalar_one()
    assert row.attempts == 1 and row.done_at is None and "unavailable" in row.last_error.lower()
    assert timedelta(seconds=1) <= row.next_attempt_at - now <= timedelta(seconds=3)  # 2 s × [0.5, 1.5]
    status = outbox_status(services.db, now=now + timedelta(seconds=30))
    assert status["depth"] >= 1 and status["failing"] >= 1 and status["oldest_age_seconds"] >= 30
    # Not due yet: nothing happens; due again: the real directory takes it, idempotently.
    assert publisher.drain(user_dn=dn, now=now) == 0
    assert services.publisher.drain(user_dn=dn, now=now + timedelta(seconds=5)) == 1
    assert services.directory.find_user(email).certificates == (issued.certificate.public_bytes(Encoding.DER),)


def test_revocation_is_refused_at_once_and_on_a_new_numbered_crl(services, ldap_admin, new_user, group):
    dn, email = member(ldap_admin, new_user, group)
    issued = issue(services, email)
    services.publisher.drain(user_dn=dn)
    before = services.ca.crl()
    number = before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert not services.ca.is_revoked(issued.certificate)
    assert services.ca.revoke(issued.serial, x509.ReasonFlags.key_compromise)
    assert services.ca.is_revoked(issued.certificate)  # no cache: the next request is refused
    crl = services.ca.crl()
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    entry = crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    services.publisher.drain()
    assert services.directory.find_user(email).certificates == ()  # unpublished
    with services.db.read() as session:  # escrow retention: old mail stays readable
        assert session.execute(select(Escrow.serial).where(Escrow.serial == issued.serial)).scalar_one()
    assert not services.ca.revoke(issued.serial, x509.ReasonFlags.key_compromise)  # already revoked


def test_worker_rebuilds_the_crl_before_next_update(services):
    services.ca.refresh_crl()
    assert not services.publisher.refresh_crl_if_due(force_check=True)  # fresh: nothing to do
    with services.db.transaction() as session:
        state = session.get(CrlState, 1)
        number = state.number
        state.next_update = datetime.now(timezone.utc) + services.ca.crl_validity / 2 - timedelta(minutes=1)
    assert services.publisher.refresh_crl_if_due(force_check=True)
    with services.db.transaction() as session:
        state = session.get(CrlState, 1)
        assert state.number == number + 1
        assert state.next_update > datetime.now(timezone.utc) + services.ca.crl_validity * 0.9
        queued = session.execute(select(Outbox).where(Outbox.reason == "crl", Outbox.done_at.is_(None))).first()
    assert queued is not None
    services.publisher.drain()
    assert outbox_status(services.db)["depth"] == 0


def test_records_that_cannot_be_read_again_after_the_modify_defer_to_the_worker_not_fail(
        services, ldap_admin, new_user, group, monkeypatch):
    """The inline publication runs after the certificate's commit: the database going away before the
    check of our records that follows the modify must not fail the request (whose answer would then be
    lost), only hand the rows to the worker, which publishes and checks again."""
    from sqlalchemy.exc import OperationalError
    dn, email = member(ldap_admin, new_user, group)
    issued = issue(services, email)
    db = services.publisher.db
    real = db._query

    def database_gone(statement, parameters):  # under the store's translation of database errors
        raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(db, "_query", database_gone)
    assert services.publisher.publish_user_now(dn, rows=[issued.outbox], certs=issued.user_certificates) is False
    monkeypatch.setattr(db, "_query", real)
    assert services.publisher.pending(dn)  # still the worker's, due now
    assert services.publisher.drain(user_dn=dn) == 1
    assert not services.publisher.pending(dn)
    values = services.directory.attribute_values(dn, "userCertificate;binary")
    assert values[0] == issued.certificate.public_bytes(Encoding.DER)  # published, ours first
