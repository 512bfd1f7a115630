"""LocalKeyAuthority.issue_batch (the pipeline of bulk provisioning): the invariants of one enrollment
for a whole batch, on the real database of an in-process server platform."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select

from registration_app.core.batch import BatchOrder
from registration_app.core.errors import BadRequest
from registration_app.core.model import RecoveryGrant, UserEntry
from registration_app.store import audit
from registration_app.store.models import AuditEvent, Certificate, Escrow, Outbox
from tests.directory_sync.world import make_services

SPKI = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd):
    services = make_services(tmp_path_factory.mktemp("batch"), slapd.settings())
    yield services
    services.close()


def users(count: int) -> tuple[UserEntry, ...]:
    tag = uuid.uuid4().hex[:8]
    return tuple(UserEntry(dn=f"uid={tag}-{i},ou=people,dc=example,dc=org", email=f"{tag}-{i}@example.org",
                           common_name=f"User {i}", entry_id=f"{tag}-{i}") for i in range(count))


def count(services, model, *where) -> int:
    with services.db.read() as session:
        return session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def test_a_batch_escrows_signs_and_queues_every_certificate_in_one_go(services):
    profile = services.settings.profiles["smime-encryption-ec"]
    batch = users(5)
    with services.db.read() as session:
        last_audit_id = session.execute(select(func.max(AuditEvent.id))).scalar() or 0
    result = services.key_authority.issue_batch(BatchOrder(profile=profile, users=batch, actor="test",
                                                           detail={"provisioned_for": "cn=g"}))
    assert [i.user for i in result.issued] == list(batch) and result.refused == ()
    serials = [i.serial for i in result.issued]
    assert count(services, Escrow, Escrow.serial.in_(serials)) == 5
    assert count(services, Certificate, Certificate.serial.in_(serials), Certificate.status == "valid") == 5
    with services.db.read() as session:
        outbox = dict(session.execute(select(Outbox.serial, Outbox.id).where(Outbox.serial.in_(serials))).all())
        assert audit.verify(session).ok
        issued = [e.detail for e in session.execute(select(AuditEvent).where(
            AuditEvent.event == "certificate.issued", AuditEvent.id > last_audit_id)).scalars()]
    assert [outbox[i.serial] for i in result.issued] == [i.outbox_id for i in result.issued]
    assert sorted(d["serial"] for d in issued) == sorted(serials)
    assert all(d["escrowed"] and d["escrow_id"] and d["provisioned_for"] == "cn=g" for d in issued)
    for item in result.issued:  # each certificate's key comes back from the KRA
        key = services.kra.recover(item.serial, RecoveryGrant(kind="owner", email=item.user.email, actor="test"))
        assert key.public_key().public_bytes(*SPKI) == item.certificate.public_key().public_bytes(*SPKI)


def test_a_user_who_got_a_certificate_meanwhile_is_refused_and_nothing_of_theirs_is_kept(services):
    """The batch collides (same predecessor replaced twice): it is recorded user by user, the others get
    theirs, and the refused user has neither a second certificate nor a stray escrow row."""
    profile = services.settings.profiles["smime-encryption-ec"]
    batch = users(3)
    first = services.key_authority.issue_batch(BatchOrder(profile=profile, users=batch[:1], actor="test"))
    predecessor = first.issued[0].serial
    renewal = BatchOrder(profile=profile, users=batch[:1], actor="test", replaces=(predecessor,))
    assert len(services.key_authority.issue_batch(renewal).issued) == 1
    escrows = count(services, Escrow)

    again = services.key_authority.issue_batch(BatchOrder(profile=profile, users=batch, actor="test",
                                                          replaces=(predecessor, None, None)))
    assert [i.user for i in again.issued] == list(batch[1:])
    assert again.refused == ((batch[0], "a certificate was issued meanwhile"),)
    assert count(services, Escrow) == escrows + 2
    assert count(services, Certificate, Certificate.email == batch[0].email) == 2


def test_signature_keys_are_never_made_in_a_batch(services):
    order = BatchOrder(profile=services.settings.profiles["smime-signature"], users=users(1), actor="test")
    with pytest.raises(BadRequest):
        services.key_authority.issue_batch(order, datetime.now(timezone.utc))
    assert count(services, Certificate, Certificate.email == order.users[0].email) == 0
