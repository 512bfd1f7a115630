"""A revocation racing an enrollment, in process against a real slapd, in the interleaving that left
revoked certificates published: the enrollment's transaction reads the user's rows, the revocation
commits and publishes, and only then the enrollment publishes what it read. (Hundreds of such races
against the real server: tests/e2e/test_revocation_races.py.)"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from directory_sync.bulk import BulkDirectory
from directory_sync.plan import wanted_values
from registration_app.authorities.key_authority import Decision, IssueRequest
from registration_app.store.repos import certificates_of, latest_certificate
from tests.directory_sync.world import add_group, make_services, profiles_for

PROFILE = "smime-encryption-ec"


@pytest.fixture(scope="module")
def group(slapd):
    from tests.ldap_admin import LdapAdmin
    conn = LdapAdmin.for_slapd(slapd)
    dn = add_group(conn, "race-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    conn.unbind()
    return dn


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    s = make_services(tmp_path_factory.mktemp("races"), slapd.settings(), profiles=profiles_for(group),
                      pkcs12_iterations=2048)
    yield s
    s.close()


def enroll(services, email: str, profile: str = PROFILE):
    """What the RA does for an enrollment: read the entry, issue in one transaction (the outbox row held
    back for the inline attempt), then publish inline from the rows and the entry it read."""
    user = services.directory.find_user(email)
    issued = services.key_authority.issue(issue_request(services, user, profile),
                                          decision=Decision(publish_inline=True))
    services.ra.publish_now(user.dn, issued, entry=user)
    return issued


def issue_request(services, user, profile: str = PROFILE) -> IssueRequest:
    with services.db.read() as session:
        latest = latest_certificate(session, user.email, profile)
    return IssueRequest(user=user, profile=services.settings.profiles[profile], actor="test", password="pw",
                        replaces=latest.serial if latest is not None else None)


def revoke(services, dn: str, serial: str) -> None:
    """What the RA does for a user's own revocation (keyCompromise): revoke, then publish inline."""
    services.ca.revoke(serial, x509.ReasonFlags.key_compromise, actor="test")
    services.ra.publish_now(dn)


def published(services, email: str) -> list[bytes]:
    return list(services.directory.find_user(email).certificates)


def truth(services, dn: str) -> tuple[list[bytes], set[bytes]]:
    """(what our records say the entry shows, in order; our revoked certificates)."""
    with services.db.read() as session:
        rows = certificates_of(session, dn)
    wanted = wanted_values(rows, services.settings.profiles, datetime.now(timezone.utc))
    return list(wanted.shown), {r.der for r in rows if r.status == "revoked"}


def test_a_revocation_published_before_a_stale_enrollment_publication_stays(services, ldap_admin, new_user, group):
    """The interleaving that lost revocations, made to happen: the enrollment reads its rows in its
    transaction, the revocation commits and publishes, and only then the enrollment publishes."""
    dn, email = new_user()
    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
    enroll(services, email)
    user = services.directory.find_user(email)
    issued = services.key_authority.issue(issue_request(services, user), decision=Decision(publish_inline=True))
    assert [r.der for r in issued.user_certificates if r.status == "valid"] == [
        issued.certificate.public_bytes(Encoding.DER)]
    revoke(services, dn, issued.serial)  # committed and published now, before the enrollment publishes
    services.ra.publish_now(user.dn, issued, entry=user)  # planned from rows that call it valid
    shown, revoked = truth(services, dn)
    assert shown == [] and not revoked & set(published(services, email))


def test_a_bulk_publication_planned_before_a_revocation_is_published_again(services, ldap_admin, new_user, group):
    """Reconcile and provisioning publish from rows read at the start of a pass: `converge` reads them
    again afterwards and publishes the users whose records changed meanwhile."""
    dn, email = new_user()
    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
    issued = enroll(services, email)
    now = datetime.now(timezone.utc)
    with services.db.read() as session:
        planned = wanted_values(certificates_of(session, dn), services.settings.profiles, now)  # the pass reads
    revoke(services, dn, issued.serial)
    with BulkDirectory(services.directory) as bulk:
        assert bulk.publish(dn, published(services, email), planned)  # the pass publishes what it read
    assert published(services, email) == [issued.certificate.public_bytes(Encoding.DER)]  # revoked, yet shown
    assert services.publisher.converge({dn: planned}, now) == 1
    assert published(services, email) == []
    assert services.publisher.converge({dn: wanted_values([], services.settings.profiles, now)}, now) == 0
