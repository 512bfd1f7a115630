"""An enrollment's one transaction and its inline publication, against a real slapd and SQLite:
all or nothing (nonce, escrow, certificate, outbox, audit), a nonce used once even by racing requests,
and the outbox row marked done by the batching thread or handed to the worker when LDAP fails."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select

from directory_sync.ldap import LdapDirectory
from directory_sync.publisher import Publisher
from directory_sync.slapd import free_port
from registration_app.authorities.key_authority import Decision, IssueRequest
from registration_app.core.errors import BadNonce, EscrowFailed
from registration_app.store.models import AuditEvent, Certificate, Escrow, Nonce, Outbox
from registration_app.auth.nonces import check as nonce_unused, issue as issue_nonce
from tests.directory_sync.world import add_group, make_services, profiles_for

PROFILE = "smime-encryption-ec"


@pytest.fixture(scope="module")
def group(slapd):
    from tests.ldap_admin import LdapAdmin
    conn = LdapAdmin.for_slapd(slapd)
    dn = add_group(conn, "one-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    conn.unbind()
    return dn


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    s = make_services(tmp_path_factory.mktemp("one-transaction"), slapd.settings(), profiles=profiles_for(group))
    yield s
    s.close()


@pytest.fixture
def user(services, ldap_admin, new_user, group):
    dn, email = new_user()
    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
    return services.directory.find_user(email)


def issue(services, user, *, nonce=None, publish_inline: bool = False, now=None, **extra):
    """The key authority's issuance with the RA's decision (enrollment.allowed, the nonce) riding in it."""
    allowed = dict(event="enrollment.allowed", outcome="allowed", actor="test", subject=user.email,
                   detail={"profile": PROFILE})
    return services.key_authority.issue(
        IssueRequest(user=user, profile=services.settings.profiles[PROFILE], actor="test", password="pw", **extra),
        now=now, decision=Decision(audit_events=[allowed], nonce=nonce, publish_inline=publish_inline))


def counts(services, email: str) -> dict:
    with services.db.read() as session:
        def count(model, *where):
            return session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
        return {"certificates": count(Certificate, Certificate.email == email),
                "escrows": count(Escrow, Escrow.email == email),
                "outbox": count(Outbox, Outbox.email == email),
                "allowed": count(AuditEvent, AuditEvent.subject == email, AuditEvent.event == "enrollment.allowed"),
                "issued": count(AuditEvent, AuditEvent.subject == email, AuditEvent.event == "certificate.issued")}


def a_nonce(services):
    token = nonce_unused(services.db, issue_nonce(services.db, timedelta(minutes=5)))
    assert token is not None
    return token


def test_a_failure_after_the_escrow_insert_leaves_nothing_but_the_decision(services, user, monkeypatch):
    token = a_nonce(services)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while recording the certificate")

    monkeypatch.setattr(services.ca, "record_issued", broken)
    with pytest.raises(EscrowFailed):
        issue(services, user, nonce=token)
    # the escrow row, the nonce and the certificate rolled back together; the decision is kept alone
    assert counts(services, user.email) == {"certificates": 0, "escrows": 0, "outbox": 0, "allowed": 1, "issued": 0}
    with services.db.read() as session:
        assert session.get(Nonce, token.value) is None  # the nonce can still be used: nothing happened
    monkeypatch.undo()
    issued = issue(services, user, nonce=token)
    assert counts(services, user.email) == {"certificates": 1, "escrows": 1, "outbox": 1, "allowed": 2, "issued": 1}
    assert [c.der for c in issued.user_certificates] == [issued.certificate.public_bytes(Encoding.DER)]


def test_a_nonce_carries_one_issuance_even_when_both_passed_the_check(services, user):
    token = a_nonce(services)
    second_look = nonce_unused(services.db, token.value)  # a replay checked before the first committed
    assert second_look is not None
    issue(services, user, nonce=token)
    with pytest.raises(BadNonce):
        issue(services, user, nonce=second_look)
    assert counts(services, user.email)["certificates"] == 1
    assert counts(services, user.email)["escrows"] == 1
    assert nonce_unused(services.db, token.value) is None


def test_inline_publication_holds_the_row_back_then_marks_it_done_in_a_batch(services, user, ldap_admin):
    now = datetime.now(timezone.utc)
    issued = issue(services, user, publish_inline=True, now=now)
    with services.db.read() as session:
        row = session.get(Outbox, issued.outbox.id)
    assert row.done_at is None and row.next_attempt_at >= now + timedelta(seconds=4)  # the worker leaves it
    assert services.publisher.drain(user_dn=user.dn, now=now) == 0

    assert services.ra.publish_now(user.dn, issued) is True
    assert services.publisher.completions.flush(timeout=10)
    with services.db.read() as session:
        row = session.get(Outbox, issued.outbox.id)
        published = session.execute(select(AuditEvent).where(
            AuditEvent.event == "directory.published", AuditEvent.subject == user.email)).scalars().all()
    assert row.done_at is not None
    assert len(published) == 1 and published[0].detail["serials"] == [issued.serial]
    ldap_admin.search(user.dn, "(objectClass=*)", search_scope="BASE", attributes=["userCertificate;binary"])
    values = ldap_admin.response[0]["raw_attributes"].get("userCertificate;binary", [])
    assert issued.certificate.public_bytes(Encoding.DER) in values


def test_an_inline_failure_hands_the_row_to_the_worker_at_once(services, user):
    down = LdapDirectory(services.settings.ldap.__class__(url=f"ldap://127.0.0.1:{free_port()}", timeout_seconds=0.5))
    publisher = Publisher(services.db, down, services.settings.profiles, b"")
    now = datetime.now(timezone.utc)
    issued = issue(services, user, publish_inline=True, now=now)
    assert publisher.publish_user_now(user.dn, rows=[issued.outbox], certs=issued.user_certificates) is False
    with services.db.read() as session:
        row = session.get(Outbox, issued.outbox.id)
    assert row.done_at is None and row.next_attempt_at <= datetime.now(timezone.utc)
    assert row.last_error and "unavailable" in row.last_error.lower()
    assert services.publisher.drain(user_dn=user.dn) == 1  # the real directory's worker publishes it now


def test_the_next_issuance_marks_what_the_previous_one_published(services, user, new_user, ldap_admin, group):
    """Marking rides in the next enrollment's transaction (no commit of its own); if that transaction
    rolls back, the rows are queued again and still marked once."""
    completions = services.publisher.completions
    first = issue(services, user, publish_inline=True)
    completions.LINGER = 30.0  # the thread must not mark them itself while this test looks
    try:
        assert services.ra.publish_now(user.dn, first) is True
        dn, email = new_user()
        assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
        other = services.directory.find_user(email)

        carried = completions.take()  # held by this test while the next issuance commits without it
        assert [rows[0].id for _target, rows in carried] == [first.outbox.id]
        used = a_nonce(services)
        second = issue(services, other, nonce=used)  # the nonce is spent now
        completions.settle(carried, requeue=True)  # queued again: the next issuance carries them
        with pytest.raises(BadNonce):  # a transaction that rolls back: the marks go with it
            issue(services, other, nonce=used)
        with services.db.read() as session:
            assert session.get(Outbox, first.outbox.id).done_at is None

        issue(services, other, replaces=second.serial)  # carries the rows again, and marks them
        assert completions.take() == []
    finally:
        completions.LINGER = type(completions).LINGER
    with services.db.read() as session:
        assert session.get(Outbox, first.outbox.id).done_at is not None
        published = session.execute(select(AuditEvent).where(
            AuditEvent.event == "directory.published", AuditEvent.subject == user.email)).scalars().all()
    assert len(published) == 1 and published[0].detail["serials"] == [first.serial]


def test_with_no_issuance_after_them_the_thread_marks_the_rows_published_meanwhile(services, user, new_user,
                                                                                  ldap_admin, group):
    """Rows submitted while the batching thread lingers do not wake it (a context switch per
    enrollment under load): it still marks all of them, in one transaction, once its linger is over."""
    from bench.platform import eventually
    completions = services.publisher.completions
    completions.LINGER = 0.3
    assert completions.flush(timeout=10)  # whatever an earlier test left lingering ends: the thread waits idle
    try:
        dn, email = new_user()
        assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
        other = services.directory.find_user(email)
        issued = [issue(services, u, publish_inline=True) for u in (user, other)]
        for u, one in zip((user, other), issued):
            assert services.ra.publish_now(u.dn, one) is True

        def marked() -> bool:
            with services.db.read() as session:
                return all(session.get(Outbox, one.outbox.id).done_at is not None for one in issued)

        eventually(marked, timeout=10, what="the lingering thread to mark both rows")
    finally:
        completions.LINGER = type(completions).LINGER
    with services.db.read() as session:
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event == "directory.published", AuditEvent.subject.in_([user.email, other.email]))).scalars().all()
    assert sorted(e.subject for e in events) == sorted([user.email, other.email])
