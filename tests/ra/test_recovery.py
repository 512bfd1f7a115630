"""The m-of-n recovery state machine of ra/recovery.py, in process on an in-memory directory
(tests/ra/conftest.py): open, approve, refuse, release, expiry; approvals count at release only while
their officers still are officers. tests/e2e/test_lifecycle.py shows the same through gunicorn and slapd."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs12
from sqlalchemy import select

from registration_app.core.errors import (AlreadyApproved, NotOfficer, NotRequester, RecoveryExpired,
                                          RecoveryNotReady, SelfApproval)
from registration_app.store.models import AuditEvent
from tests.ra.conftest import OFFICERS

PASSWORD = "recovered-pw"


@pytest.fixture(scope="module")
def case(ra_world):
    """Three officers (quorum 2) and a user with one escrowed encryption key."""
    officers = [ra_world.person(OFFICERS) for _ in range(3)]
    user = ra_world.person()
    issued = ra_world.services.ra.enroll(ra_world.request(user, {"profile": "smime-encryption-ec", "password": "pw"}))
    return officers, user, issued


def opened(ra_world, case, now=None) -> str:
    (opener, _, _), user, issued = case
    view = ra_world.services.recovery.open_request(ra_world.request(opener, {
        "email": user.email, "serials": [issued["serial"]], "reason": "left the company"}), now=now)
    assert (view["status"], view["requester"], view["approvals"]) == ("pending", opener.email, [])
    return view["id"]


def approve(ra_world, case, officer, request_id: str, now=None) -> dict:
    _, user, issued = case
    return ra_world.services.recovery.approve(
        ra_world.request(officer, {"email": user.email, "serials": [issued["serial"]]}), request_id, now=now)


def release(ra_world, officer, request_id: str, now=None) -> dict:
    return ra_world.services.recovery.release(ra_world.request(officer, {"password": PASSWORD}), request_id, now=now)


def events(ra_world, request_id: str) -> list[str]:
    with ra_world.services.db.read() as session:
        rows = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()
        return [r.event for r in rows if isinstance(r.detail, dict) and r.detail.get("request_id") == request_id]


def test_a_request_approved_by_the_quorum_is_released_once_to_its_requester(ra_world, case):
    (opener, second, third), user, issued = case
    request_id = opened(ra_world, case)
    with pytest.raises(SelfApproval):
        approve(ra_world, case, opener, request_id)
    assert approve(ra_world, case, second, request_id)["status"] == "pending"  # 1 of 2
    with pytest.raises(AlreadyApproved):
        approve(ra_world, case, second, request_id)
    with pytest.raises(RecoveryNotReady, match="needs 2 approvals"):
        release(ra_world, opener, request_id)
    assert approve(ra_world, case, third, request_id)["status"] == "approved"
    with pytest.raises(NotRequester):
        release(ra_world, second, request_id)

    released = release(ra_world, opener, request_id)
    assert released["status"] == "released" and [k["serial"] for k in released["keys"]] == [issued["serial"]]
    key, cert, _ = pkcs12.load_key_and_certificates(base64.b64decode(released["keys"][0]["pkcs12"]),
                                                    PASSWORD.encode())
    assert format(cert.serial_number, "x") == issued["serial"]  # the user's certificate, and its very key
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    with pytest.raises(RecoveryNotReady, match="released once"):
        release(ra_world, opener, request_id)
    assert events(ra_world, request_id) == ["recovery.requested", "recovery.approved", "recovery.approved",
                                            "recovery.released", "key.recovered"]


def test_a_refused_request_can_be_neither_approved_nor_released(ra_world, case):
    (opener, second, third), _, _ = case
    request_id = opened(ra_world, case)
    assert approve(ra_world, case, second, request_id)["approvals"] == [second.email]
    assert ra_world.services.recovery.refuse(ra_world.request(third, {}), request_id)["status"] == "refused"
    with pytest.raises(RecoveryNotReady, match="is refused"):
        approve(ra_world, case, third, request_id)
    with pytest.raises(RecoveryNotReady):
        release(ra_world, opener, request_id)
    assert events(ra_world, request_id) == ["recovery.requested", "recovery.approved", "recovery.refused"]


def test_an_officer_removed_after_approving_no_longer_counts_at_release(ra_world, case):
    (opener, second, third), _, _ = case
    request_id = opened(ra_world, case)
    approve(ra_world, case, second, request_id)
    assert approve(ra_world, case, third, request_id)["status"] == "approved"
    ra_world.directory.remove_member(OFFICERS, third.dn)

    with pytest.raises(RecoveryNotReady, match="1 approvals by current officers; 2 are needed") as refused:
        release(ra_world, opener, request_id)
    assert third.email in str(refused.value.detail)
    view = ra_world.services.recovery.view(request_id)
    assert view["status"] == "approved" and view["discounted"] == [{"officer": third.email, "why": "not an officer"}]
    with pytest.raises(NotOfficer):  # nor may they act any more
        approve(ra_world, case, third, request_id)

    # Put back, the approval counts again and the same request is released.
    ra_world.directory.add_member(OFFICERS, third.dn)
    released = release(ra_world, opener, request_id)
    assert released["status"] == "released" and len(released["keys"]) == 1
    assert events(ra_world, request_id) == ["recovery.requested", "recovery.approved", "recovery.approved",
                                            "recovery.release_refused", "recovery.released", "key.recovered"]


def test_a_request_expires_unreleased(ra_world, case):
    (opener, second, third), _, _ = case
    now = datetime.now(timezone.utc)
    request_id = opened(ra_world, case, now=now)
    approve(ra_world, case, second, request_id, now=now)
    later = now + timedelta(hours=ra_world.services.settings.recovery_request_ttl_hours, seconds=1)
    with pytest.raises(RecoveryExpired):
        approve(ra_world, case, third, request_id, now=later)
    assert ra_world.services.recovery.view(request_id, later)["status"] == "expired"
    with pytest.raises(RecoveryExpired):
        release(ra_world, opener, request_id, now=later)
