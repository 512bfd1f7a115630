"""Schema gaps against a real slapd: an entry whose object classes do not allow userCertificate gets
pkiUser in the same modify; where the directory refuses (the class, or a value too large), the outbox
row ends in `schema_refused` with the directory's message (sync status, audit log) and is not retried."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select

from directory_sync.config import AttributeMap
from directory_sync.ldap import LdapDirectory
from directory_sync.publisher import SCHEMA_REFUSED
from registration_app.ra.operators import directory_status
from registration_app.core.errors import SchemaRefused
from registration_app.core.model import Wanted
from registration_app.store.models import AuditEvent, Certificate, Outbox
from registration_app.web.status import status_of
from tests.directory_sync.world import add_group, issue, make_services, profiles_for
from tests.ldap_admin import LdapAdmin


@pytest.fixture(scope="module")
def group(slapd):
    conn = LdapAdmin.for_slapd(slapd)
    dn = add_group(conn, "schema-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    conn.unbind()
    return dn


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    s = make_services(tmp_path_factory.mktemp("schema"), slapd.settings(), profiles=profiles_for(group))
    yield s
    s.close()


@pytest.fixture(scope="module")
def services_with_unknown_class(tmp_path_factory, slapd, group):
    """A directory whose schema has no such auxiliary class: adding it is refused."""
    attributes = dataclasses.replace(AttributeMap.openldap(), certificate_object_class="autoenrollNoSuchClass")
    s = make_services(tmp_path_factory.mktemp("schema-refused"), slapd.settings(attributes=attributes),
                      profiles=profiles_for(group))
    yield s
    s.close()


def pilot_person(ldap_admin, group) -> tuple[str, str]:
    """A user whose only classes (pilotPerson: cosine) allow mail but not userCertificate."""
    uid = "p-" + uuid.uuid4().hex[:10]
    dn, email = f"uid={uid},ou=people,dc=example,dc=org", f"{uid}@example.org"
    assert ldap_admin.add(dn, ["pilotPerson", "uidObject"], {"uid": uid, "cn": uid, "sn": "Pilot", "mail": email}), \
        ldap_admin.result
    assert ldap_admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), ldap_admin.result
    return dn, email


def test_an_entry_without_a_class_for_certificates_gets_pkiuser_in_the_publishing_modify(services, ldap_admin, group):
    dn, email = pilot_person(ldap_admin, group)
    issued = issue(services, email)
    assert services.publisher.drain(user_dn=dn) == 1
    assert b"pkiUser" in ldap_admin.values(dn, "objectClass")
    assert ldap_admin.values(dn, "userCertificate;binary") == [issued.certificate.public_bytes(Encoding.DER)]
    assert not services.publisher.pending(dn)


def test_a_refused_class_ends_the_row_in_schema_refused_with_the_directorys_message(
        services_with_unknown_class, ldap_admin, group):
    services = services_with_unknown_class
    dn, email = pilot_person(ldap_admin, group)
    issued = issue(services, email)
    assert services.publisher.drain(user_dn=dn) == 1  # completed: in its final state, not retried
    with services.db.transaction() as session:
        row = session.execute(select(Outbox).where(Outbox.serial == issued.serial)).scalar_one()
        refused = session.execute(select(AuditEvent).where(AuditEvent.event == "publish.schema_refused",
                                                           AuditEvent.subject == email)).scalar_one()
        kept = session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.serial == issued.serial)).scalar_one()
    assert row.done_at is not None and row.last_error.startswith(f"{SCHEMA_REFUSED}: The directory refused")
    assert "objectClass" in row.last_error  # the directory's own words
    assert issued.serial in refused.detail["serials"] and refused.outcome == "failed"
    assert kept == 1  # the certificate is ours whatever the directory says
    status = directory_status(services.db)
    assert status["schema_refused"] >= 1
    assert any(r["serial"] == issued.serial and "objectClass" in r["directory_said"]
               for r in status["schema_refused_rows"])
    assert services.publisher.drain(user_dn=dn) == 0  # nothing due: no endless retry
    assert ldap_admin.values(dn, "userCertificate;binary") == []


def oversized_certificate() -> bytes:
    """A well-formed certificate of about 40 kB (an extension of padding): larger than the directory takes."""
    from cryptography import x509
    from bench.pki import make_ca
    ca = make_ca("Oversized")
    padding = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x04\x82\x9c\x40" + b"x" * 40_000)
    builder = (x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
               .public_key(ca.key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(ca.cert.not_valid_before_utc).not_valid_after(ca.cert.not_valid_after_utc)
               .add_extension(padding, critical=False))
    from cryptography.hazmat.primitives import hashes
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_a_value_larger_than_the_directory_takes_is_refused_for_good(slapd, new_user):
    dn, _ = new_user()
    directory = LdapDirectory(slapd.settings())
    try:
        with pytest.raises(SchemaRefused, match="Constraint violation") as refused:
            directory.publish(dn, Wanted(first=(oversized_certificate(),)))
    finally:
        directory.close()
    assert status_of(refused.value) == 503 and refused.value.code == "schema_refused"


def test_a_queued_value_larger_than_the_attribute_takes_ends_its_row_in_schema_refused_and_stays_issued(
        services, ldap_admin, group):
    """The same refusal through the outbox: the row is in its final state with the directory's words, the
    certificate stays ours (its row as it was issued: the directory's limit is not ours to enforce)."""
    from sqlalchemy import update
    dn, email = pilot_person(ldap_admin, group)
    issued = issue(services, email)
    with services.db.transaction() as session:  # as if the certificate were larger than AD's 32 kB
        session.execute(update(Certificate).where(Certificate.serial == issued.serial)
                        .values(der=oversized_certificate()))
    assert services.publisher.drain(user_dn=dn) == 1  # completed, not retried
    with services.db.transaction() as session:
        row = session.execute(select(Outbox).where(Outbox.serial == issued.serial)).scalar_one()
        status = session.execute(select(Certificate.status).where(Certificate.serial == issued.serial)).scalar_one()
    assert row.done_at is not None and row.last_error.startswith(f"{SCHEMA_REFUSED}: The directory refused")
    assert "Constraint violation" in row.last_error and status == "valid"
    assert any(r["serial"] == issued.serial and "Constraint violation" in r["directory_said"]
               for r in directory_status(services.db)["schema_refused_rows"])
    assert services.publisher.drain(user_dn=dn) == 0
    assert ldap_admin.values(dn, "userCertificate;binary") == []
