"""RegistrationAuthority's policy, in process on an in-memory directory (tests/ra/conftest.py): the daily
limit, the renewal window, `renews` idempotency, entitlement read on every request, and the audit row of
every refusal. tests/e2e/test_lifecycle.py shows the same through gunicorn and slapd."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from registration_app.agent.actions import make_csr
from registration_app.auth import nonces
from registration_app.core.errors import Conflict, KeyStoreUnavailable, NotEntitled, RateLimited
from registration_app.ra.authority import Refusal
from registration_app.store.models import AuditEvent
from tests.ra.conftest import ENTITLED

EC = "smime-encryption-ec"
SIGNATURE = "smime-signature"
NOW = datetime.now(timezone.utc)
IN_THE_WINDOW = timedelta(days=365 - 60 + 1)  # validity 365 days, renewal window 60 days


def audit_rows(ra_world, event: str, subject: str) -> list[AuditEvent]:
    with ra_world.services.db.read() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.event == event,
                                                             AuditEvent.subject == subject)).scalars())


def test_enrollments_over_the_daily_limit_are_refused_until_a_day_has_passed(ra_world):
    ra, user = ra_world.services.ra, ra_world.person()
    payload = {"profile": EC, "password": "pw", "replace": True}
    issued = [ra.enroll(ra_world.request(user, payload), now=NOW + timedelta(minutes=i))["serial"] for i in range(3)]

    with pytest.raises(RateLimited, match="at most 3 certificates a day") as refused:
        ra.enroll(ra_world.request(user, payload), now=NOW + timedelta(hours=23))
    assert refused.value.retry_after == 3600
    assert [serial for serial, _, _ in ra_world.history(user, EC)] == issued[::-1]  # nothing more issued

    # A day after the first, two of the last day remain: one more is allowed, and it replaces the last.
    fourth = ra.enroll(ra_world.request(user, payload), now=NOW + timedelta(days=1, seconds=30))
    assert ra_world.history(user, EC)[0] == (fourth["serial"], "valid", issued[-1])
    assert [status for _, status, _ in ra_world.history(user, EC)[1:]] == ["superseded"] * 3
    assert ra_world.shown(user) == [int(fourth["serial"], 16)] and fourth["published"] is True


def test_a_current_certificate_is_renewed_only_once_its_window_opens(ra_world):
    ra, user = ra_world.services.ra, ra_world.person()
    payload = {"profile": EC, "password": "pw"}
    first = ra.enroll(ra_world.request(user, payload), now=NOW)

    with pytest.raises(Conflict, match="renewal opens on") as early:
        ra.enroll(ra_world.request(user, payload), now=NOW + timedelta(days=1))
    assert early.value.extra["serial"] == first["serial"]

    renewed = ra.enroll(ra_world.request(user, payload), now=NOW + IN_THE_WINDOW)
    assert ra_world.history(user, EC) == [(renewed["serial"], "valid", first["serial"]),
                                          (first["serial"], "superseded", None)]
    assert ra_world.shown(user) == [int(renewed["serial"], 16)]  # the superseded one left the directory


def test_renews_renews_a_certificate_once_and_a_retry_gets_the_same_certificate(ra_world):
    ra, user = ra_world.services.ra, ra_world.person()
    first = ra.enroll(ra_world.request(user, {"profile": SIGNATURE, "csr": make_csr(new_key(), user.email)}),
                      now=NOW)
    renewal = {"profile": SIGNATURE, "csr": make_csr(new_key(), user.email), "renews": first["serial"]}
    renewed = ra.enroll(ra_world.request(user, renewal), now=NOW + IN_THE_WINDOW)
    assert renewed["serial"] != first["serial"] and "repeated" not in renewed

    # The answer was lost: the daemon sends the same renewal again and gets the same certificate.
    again = ra.enroll(ra_world.request(user, renewal), now=NOW + IN_THE_WINDOW + timedelta(minutes=5))
    assert again["repeated"] is True
    assert (again["serial"], again["certificate"]) == (renewed["serial"], renewed["certificate"])
    assert ra_world.history(user, SIGNATURE) == [(renewed["serial"], "valid", first["serial"]),
                                                 (first["serial"], "superseded", None)]

    # Another daemon renewing the same certificate with another key is refused: it was renewed already.
    other = {**renewal, "csr": make_csr(new_key(), user.email)}
    with pytest.raises(Conflict, match="already renewed") as twice:
        ra.enroll(ra_world.request(user, other), now=NOW + IN_THE_WINDOW + timedelta(minutes=6))
    assert twice.value.extra["current"] == renewed["serial"]
    assert len(ra_world.history(user, SIGNATURE)) == 2


def test_entitlement_is_read_on_every_request(ra_world):
    ra, user = ra_world.services.ra, ra_world.person()
    payload = {"profile": EC, "password": "pw", "replace": True}
    issued = ra.enroll(ra_world.request(user, payload), now=NOW)
    ra_world.directory.remove_member(ENTITLED, user.dn)

    with pytest.raises(NotEntitled, match=f"not a member of a group entitled to profile '{EC}'"):
        ra.enroll(ra_world.request(user, payload), now=NOW + timedelta(minutes=1))
    assert ra_world.history(user, EC) == [(issued["serial"], "valid", None)]
    assert len(audit_rows(ra_world, "enrollment.allowed", user.email)) == 1


def test_a_refusal_is_audited_with_its_nonce_used_and_a_key_store_failure_leaves_the_nonce(ra_world):
    services = ra_world.services
    ttl = timedelta(minutes=5)
    refused_nonce, failed_nonce = nonces.issue(services.db, ttl), nonces.issue(services.db, ttl)
    for code, nonce, email in (("not_entitled", refused_nonce, "refused@example.org"),
                               (KeyStoreUnavailable.code, failed_nonce, "failed@example.org")):
        services.ra.refused(Refusal(actor="CN=mail.example.org", subject=email, path="/api/v1/enroll", code=code,
                                    reason="why", request_id="r-1", nonce=nonces.check(services.db, nonce)))

    (denied,) = audit_rows(ra_world, "request.denied", "refused@example.org")
    assert (denied.outcome, denied.detail["code"]) == ("denied", "not_entitled")
    assert nonces.check(services.db, refused_nonce) is None  # used with the refusal: not again
    (failed,) = audit_rows(ra_world, "key_store.unavailable", "failed@example.org")
    assert (failed.outcome, failed.detail["code"], failed.detail["path"]) == \
        ("failed", "key_store_unavailable", "/api/v1/enroll")
    assert audit_rows(ra_world, "request.denied", "failed@example.org") == []
    assert nonces.check(services.db, failed_nonce) is not None  # nothing was done: the agent may send it again


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
