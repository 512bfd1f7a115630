"""Bulk pre-provisioning against a real slapd: one escrowed, published certificate per entitled member,
idempotent, resumable, recoverable by the owner."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select

from directory_sync.provision import BulkPublication
from registration_app.authorities.kra import RecoveryGrant
from registration_app.core.errors import BadRequest
from registration_app.ra.provision import Provisioner
from registration_app.store import audit
from registration_app.store.models import Certificate, Escrow
from registration_app.store.repos import outbox_status
from bench.world import add_users
from tests.directory_sync.world import add_group, make_services, profiles_for

COUNT = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory, slapd):
    """COUNT users in a fresh group `bulk-*` (entitled by `ent-*`), plus one member who is not entitled."""
    from tests.ldap_admin import LdapAdmin
    tag = uuid.uuid4().hex[:8]
    dns = add_users(slapd, [f"p{tag}-{i}" for i in range(COUNT + 1)])
    conn = LdapAdmin.for_slapd(slapd)
    bulk = add_group(conn, f"bulk-{tag}", dns)
    entitled = add_group(conn, f"ent-{tag}", dns[:COUNT])
    conn.unbind()
    services = make_services(tmp_path_factory.mktemp("provision"), slapd.settings(), profiles=profiles_for(entitled))
    yield services, bulk, dns
    services.close()


def provisioner(services, **kw) -> Provisioner:
    return Provisioner(services, batch_size=64, **kw)


def test_provision_publishes_one_each_then_issues_none(world):
    services, group, dns = world
    profile = services.settings.profiles["smime-encryption-ec"]
    report = provisioner(services).run(group, profile)
    assert (report.members, report.entitled, report.issued, report.published) == (COUNT + 1, COUNT, COUNT, COUNT)
    assert report.queued == 0 and not report.failed
    assert outbox_status(services.db)["depth"] == 0

    with services.db.transaction() as session:
        certs = {c.user_dn: c for c in session.execute(select(Certificate).where(
            Certificate.profile == profile.name)).scalars()}
        escrowed = session.execute(select(func.count()).select_from(Escrow)).scalar_one()
        assert audit.verify(session).ok
    assert set(certs) == set(dns[:COUNT]) and escrowed == COUNT
    for dn in (dns[0], dns[COUNT // 2], dns[COUNT - 1]):
        entry = services.directory.find_user(certs[dn].email)
        assert entry.certificates == (certs[dn].der,)
        assert entry.entry_id and certs[dn].entry_id == entry.entry_id  # bound to the entry, not only the address
    assert services.directory.find_user(f"{dns[COUNT].split(',')[0][4:]}@example.org").certificates == ()

    again = provisioner(services).run(group, profile)
    assert (again.issued, again.already, again.published) == (0, COUNT, 0)


def test_owner_recovers_a_provisioned_key(world):
    services, group, dns = world
    with services.db.transaction() as session:
        row = session.execute(select(Certificate).where(Certificate.user_dn == dns[1])).scalar_one()
    key = services.kra.recover(row.serial, RecoveryGrant(kind="owner", email=row.email, actor="test"))
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == x509.load_der_x509_certificate(row.der).public_key().public_bytes(*spki)


def test_a_revoked_member_gets_a_new_one_the_others_nothing(world):
    """Revoked certificates do not count as current: those users get a new one, the others nothing."""
    services, group, dns = world
    with services.db.transaction() as session:
        serial = session.execute(select(Certificate.serial).where(Certificate.user_dn == dns[2])).scalar_one()
    services.ca.revoke(serial, x509.ReasonFlags.key_compromise)
    services.publisher.drain()
    report = provisioner(services, workers=0).run(group, services.settings.profiles["smime-encryption-ec"])
    assert (report.issued, report.published) == (1, 1)
    with services.db.transaction() as session:
        new = session.execute(select(Certificate).where(Certificate.user_dn == dns[2],
                                                        Certificate.status == "valid")).scalar_one()
    assert new.replaces == serial
    assert services.directory.find_user(new.email).certificates == (new.der,)


def test_signature_profiles_are_not_provisioned(world):
    services, group, _ = world
    with pytest.raises(BadRequest):
        provisioner(services).run(group, services.settings.profiles["smime-signature"])


def test_a_publication_that_breaks_leaves_its_rows_queued_and_the_run_finishes(world, slapd, monkeypatch):
    """An unexpected error while preparing one batch's publication must not stop the publishing
    thread (the run would wait on its queue for ever): that batch stays in the outbox, the rest is
    published, and the worker publishes the rest later."""
    import threading

    from tests.ldap_admin import LdapAdmin
    services, _, _ = world
    (entitled,) = services.settings.profiles["smime-encryption-ec"].groups
    tag = uuid.uuid4().hex[:8]
    dns = add_users(slapd, [f"q{tag}-{i}" for i in range(24)])
    conn = LdapAdmin.for_slapd(slapd)
    group = add_group(conn, f"broken-{tag}", dns)
    for dn in dns:
        assert conn.modify(entitled, {"member": [("MODIFY_ADD", [dn])]}), conn.result
    conn.unbind()

    original, calls = BulkPublication.publication_jobs, []

    def breaks_once(self, items, now):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("database gone for a moment")
        return original(self, items, now)

    monkeypatch.setattr(BulkPublication, "publication_jobs", breaks_once)
    reports = []
    run = threading.Thread(target=lambda: reports.append(
        Provisioner(services, batch_size=2, workers=0).run(
            group, services.settings.profiles["smime-encryption-ec"])), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "provisioning hung after a publication error"
    report = reports[0]
    assert report.issued == 24 and report.queued == calls[0] and report.published == 24 - calls[0]
    monkeypatch.undo()
    assert services.publisher.drain(now=datetime.now(timezone.utc) + timedelta(minutes=10)) >= calls[0]
    for dn in dns:
        assert len(services.directory.find_user(f"{dn.split(',')[0][4:]}@example.org").certificates) == 1


def test_a_member_with_a_current_encryption_certificate_of_another_profile_is_not_provisioned_again(
        tmp_path_factory, slapd, ldap_admin, new_user):
    from tests.directory_sync.world import issue
    group = add_group(ldap_admin, "prov-one-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    services = make_services(tmp_path_factory.mktemp("provision-one"), slapd.settings(), profiles=profiles_for(group))
    try:
        (has_rsa_dn, has_rsa), (bare_dn, bare) = new_user(), new_user()
        for dn in (has_rsa_dn, bare_dn):
            assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
        issue(services, has_rsa, profile="smime-encryption")
        report = provisioner(services).run(group, services.settings.profiles["smime-encryption-ec"])
        assert (report.already, report.issued) == (1, 1)
        with services.db.transaction() as session:
            ec = session.execute(select(Certificate.email).where(
                Certificate.profile == "smime-encryption-ec")).scalars().all()
        assert ec == [bare]
    finally:
        services.close()


def test_forked_provisioning_workers_sign_with_the_keys_in_a_token(tmp_path, slapd, softhsm):
    """Every key in SoftHSM2: the forked builders open sessions of their own (a PKCS#11 session does not
    survive fork), and what they sign verifies against the CA and recovers through the token's KRA key."""
    from registration_app.settings import KeyStoreSettings
    from tests.ldap_admin import LdapAdmin
    from tests.softhsm import MODULE
    tag = uuid.uuid4().hex[:8]
    dns = add_users(slapd, [f"t{tag}-{i}" for i in range(12)])
    conn = LdapAdmin.for_slapd(slapd)
    group = add_group(conn, f"tbulk-{tag}", dns)
    entitled = add_group(conn, f"tent-{tag}", dns)
    conn.unbind()
    data = tmp_path / "data"
    softhsm.new_token(f"prov-{tag}", data / "token.pin")
    keys = KeyStoreSettings(in_token=frozenset({"ca", "kra", "tls_ca"}), module=MODULE, token=f"prov-{tag}")
    services = make_services(data, slapd.settings(), profiles=profiles_for(entitled), key_store=keys)
    try:
        assert not [p for p in data.iterdir() if p.name in ("ca.key", "kra.key", "tls-ca.key")]
        report = Provisioner(services, batch_size=4, workers=2).run(
            group, services.settings.profiles["smime-encryption-ec"])
        assert report.issued == 12 and not report.failed
        with services.db.transaction() as session:
            rows = session.execute(select(Certificate).where(Certificate.user_dn.in_(dns))).scalars().all()
        assert len(rows) == 12
        for row in rows:  # signed in the forked builders, through the token
            x509.load_der_x509_certificate(row.der).verify_directly_issued_by(services.ca.certificate)
        key = services.kra.recover(rows[0].serial, RecoveryGrant(kind="owner", email=rows[0].email, actor="test"))
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        assert key.public_key().public_bytes(*spki) == \
            x509.load_der_x509_certificate(rows[0].der).public_key().public_bytes(*spki)
    finally:
        services.close()
