"""The product beside Active Directory: a real Samba AD DC (tests/samba_dc.py) in a private network
namespace, reached over LDAPS verified against the certificate the test issued for it, as a service
account that may write userCertificate and nothing else; the `ad` preset ([ldap] preset = "ad").

alice is in platform-team, two levels under the entitled group smime-users (smime-users > engineering >
platform-team); bob is in no group; erin is in sales (smime-users > sales)."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select

from bench.platform import SUITE_SETTINGS, ServerPlatform, make_platform
from registration_app.store.models import Certificate
from tests.e2e.test_enrollment import invite_and_bootstrap
from tests.e2e.test_gpgsm import Gpgsm
from tests.ldap_admin import BASE as SCOPE_BASE
from tests.ldap_admin import MODIFY_ADD, MODIFY_DELETE, LdapAdmin
from tests.samba_dc import (ADMIN_PASSWORD, BASE, CA_CONTAINER, GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD,
                            SambaDC)

ADMIN_DN = f"CN=Administrator,CN=Users,{BASE}"
CA_DN = f"CN=Autoenroll CA,{CA_CONTAINER}"


@pytest.fixture(scope="module")
def ad(samba_dc, tmp_path_factory):
    """A server platform configured with the ad preset, everything of this module inside the DC's
    network namespace (the platform, python-ldap, requests, ldapsearch, gpgsm)."""
    with samba_dc.namespace.entered():
        data = tmp_path_factory.mktemp("ad-platform")
        password_file = data / "ldap.pass"
        password_file.touch(mode=0o600)
        password_file.write_text(SERVICE_PASSWORD + "\n")
        ldap = {"preset": "ad", "bind_dn": SERVICE_DN, "password_file": str(password_file),
                "ca_file": str(samba_dc.ca_file), "base_dn": BASE, "users_base": PEOPLE, "groups_base": GROUPS,
                "timeout_seconds": 5.0}
        profiles = {name: {"groups": ["smime-users"]}
                    for name in ("smime-encryption", "smime-encryption-ec", "smime-signature")}
        platform = make_platform(data, samba_dc.url, ldap=ldap, profiles=profiles, publish_timeout_seconds=10.0,
                                 recovery_officers_group="smime-users", **SUITE_SETTINGS)
        with platform.running():
            yield platform


@pytest.fixture
def admin(samba_dc, ad):
    """The domain's Administrator over LDAPS (verified), for arranging and inspecting the directory."""
    conn = LdapAdmin(samba_dc.url, ADMIN_DN, ADMIN_PASSWORD, ca_file=str(samba_dc.ca_file))
    yield conn
    conn.unbind()


def dc_certificates(dc: SambaDC, email: str) -> list[bytes]:
    """userCertificate of the entry with this mail, as ldapsearch reads it over LDAPS (not our code)."""
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", dc.url, "-D", SERVICE_DN,
                          "-w", SERVICE_PASSWORD, "-b", PEOPLE, f"(mail={email})", "userCertificate"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "LDAPTLS_CACERT": str(dc.ca_file), "LDAPTLS_REQCERT": "demand"}).stdout
    return [base64.b64decode(line.split(":: ", 1)[1]) for line in out.splitlines()
            if line.lower().startswith("usercertificate::")]


def rows(platform: ServerPlatform, email: str, **where) -> list[Certificate]:
    with platform.transaction() as session:
        query = select(Certificate).where(func.lower(Certificate.email) == email.lower())
        for name, value in where.items():
            query = query.where(getattr(Certificate, name) == value)
        return list(session.execute(query).scalars())


def delivered(platform: ServerPlatform, email: str, profile: str) -> tuple[Path, x509.Certificate]:
    """The newest PKCS#12 the agent stored for `profile`, and its certificate."""
    p12 = max((platform.data / "agent-store" / email).glob(f"{profile}-*.p12"), key=lambda p: p.stat().st_mtime)
    return p12, x509.load_pem_x509_certificates(p12.with_suffix(".pem").read_bytes())[0]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def test_the_ca_is_published_where_windows_clients_look_for_enterprise_roots(ad, admin):
    out = ad.autoenroll("crl", "--refresh")
    assert "not published" not in out.stderr, out.stderr
    assert admin.search(CA_DN, "(objectClass=certificationAuthority)", SCOPE_BASE,
                        ["cACertificate", "certificateRevocationList", "authorityRevocationList"]), admin.result
    entry = admin.response[0]["raw_attributes"]
    ca = x509.load_pem_x509_certificate((ad.data / "ca.pem").read_bytes())
    assert entry["cACertificate"] == [der(ca)]
    crl = x509.load_der_x509_crl(entry["certificateRevocationList"][0])
    assert crl.issuer == ca.subject and entry["authorityRevocationList"] == entry["certificateRevocationList"]


def test_alice_two_groups_deep_enrolls_gpgsm_reads_her_certificate_and_leaving_the_inner_group_revokes(
        ad, samba_dc, admin, tmp_path):
    email = "alice@autoenroll.test"
    invite_and_bootstrap(ad, email)
    out = ad.agent("enroll", "--email", email, "--profile", "smime-encryption", "--legacy").stdout
    assert "published in the directory" in out
    p12, cert = delivered(ad, email, "smime-encryption")
    assert dc_certificates(samba_dc, email)[0] == der(cert)  # byte for byte, first, over verified LDAPS

    # dirmngr asks the DC as the service account (AD has no anonymous reads) over TLS (`ldaptls`),
    # verifying it with libldap's TLS_CACERT.
    gpgsm = Gpgsm(tmp_path / "gnupg", "ldap://unused", env={"LDAPTLS_CACERT": str(samba_dc.ca_file)})
    (gpgsm.home / "dirmngr.conf").write_text(
        f"ldapserver 127.0.0.1:636:{SERVICE_DN}:{SERVICE_PASSWORD}:{PEOPLE}:ldaptls\n")
    try:
        gpgsm.trust(ad.data / "ca.pem")
        assert gpgsm.locate(email) == cert.fingerprint(hashes.SHA1()).hex().upper()
        (tmp_path / "message.txt").write_text("the quarterly numbers\n")
        gpgsm("--encrypt", "-r", email, "--output", str(tmp_path / "message.p7m"), str(tmp_path / "message.txt"))
        password = p12.with_suffix(".pass").read_text().strip()
        gpgsm("--pinentry-mode", "loopback", "--passphrase-fd", "0", "--import", str(p12), stdin=password + "\n")
        gpgsm("--pinentry-mode", "loopback", "--passphrase-fd", "0", "--decrypt",
              "--output", str(tmp_path / "out.txt"), str(tmp_path / "message.p7m"), stdin=password + "\n")
        assert (tmp_path / "out.txt").read_text() == "the quarterly numbers\n"
    finally:
        gpgsm.stop()

    # Renewal: the new certificate replaces the old one in the entry, in one modify.
    old = cert
    ad.agent("renew", "--email", email, "--profile", "smime-encryption", "--force")
    _, renewed = delivered(ad, email, "smime-encryption")
    assert renewed.serial_number != old.serial_number
    published = dc_certificates(samba_dc, email)
    assert published[0] == der(renewed) and der(old) not in published

    # Revocation by the operator: off the entry, and on the CRL in the CA's object.
    ad.autoenroll("revoke", f"{renewed.serial_number:x}", "--reason", "keyCompromise")
    assert der(renewed) not in dc_certificates(samba_dc, email)
    ad.autoenroll("sync", "drain")
    crl = x509.load_der_x509_crl(admin.values(CA_DN, "certificateRevocationList")[0])
    assert crl.get_revoked_certificate_by_serial_number(renewed.serial_number) is not None

    # alice leaves platform-team (two levels under smime-users): reconcile revokes and unpublishes the rest.
    (signature,) = rows(ad, email, status="valid")
    assert dc_certificates(samba_dc, email) == [signature.der]
    platform_team = f"CN=platform-team,{GROUPS}"
    alice = f"CN=Alice Liddell,{PEOPLE}"
    assert admin.modify(platform_team, {"member": [(MODIFY_DELETE, [alice])]}), admin.result
    try:
        out = ad.autoenroll("sync", "reconcile").stdout
        assert f"revoke {signature.serial}" in out and "not entitled" in out, out
        assert rows(ad, email, status="valid") == []
        assert [r.revocation_reason for r in rows(ad, email, serial=signature.serial)] == ["affiliationChanged"]
        assert dc_certificates(samba_dc, email) == []
    finally:
        assert admin.modify(platform_team, {"member": [(MODIFY_ADD, [alice])]}), admin.result


def test_bob_in_no_group_is_refused_with_403_and_the_dc_is_unchanged(ad, admin):
    email = "bob@autoenroll.test"
    bob = f"CN=Bob Builder,{PEOPLE}"
    refused = ad.autoenroll("invite", email, check=False)
    assert refused.returncode != 0 and "is not a member of a group entitled" in refused.stderr, refused.stderr
    assert rows(ad, email) == []
    # Over HTTP: bob, entitled for a moment (for his first certificate), then in no group again, asks.
    smime_users = f"CN=smime-users,{GROUPS}"
    assert admin.modify(smime_users, {"member": [(MODIFY_ADD, [bob])]}), admin.result
    try:
        invite_and_bootstrap(ad, email)
    finally:
        assert admin.modify(smime_users, {"member": [(MODIFY_DELETE, [bob])]}), admin.result
    before = admin.values(bob, "uSNChanged"), admin.values(bob, "userCertificate")
    result = ad.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    assert result.returncode == 1 and "(HTTP 403, not_entitled)" in result.stderr, result.stderr
    assert (admin.values(bob, "uSNChanged"), admin.values(bob, "userCertificate")) == before
    assert rows(ad, email, profile="smime-encryption") == []
    with ad.transaction() as session:
        from registration_app.store.models import AuditEvent
        denied = session.execute(select(AuditEvent.detail).where(
            AuditEvent.subject == email, AuditEvent.event == "request.denied")).scalars().all()
    assert [d["code"] for d in denied] == ["not_entitled"], denied


def test_moving_between_nested_groups_keeps_the_certificate_and_leaving_them_revokes_it(ad, samba_dc, admin):
    email = "carol@autoenroll.test"
    carol = f"CN=Carol Danvers,{PEOPLE}"
    # carol moves from smime-users itself into platform-team, two levels under it: still entitled.
    assert admin.modify(f"CN=platform-team,{GROUPS}", {"member": [(MODIFY_ADD, [carol])]}), admin.result
    assert admin.modify(f"CN=smime-users,{GROUPS}", {"member": [(MODIFY_DELETE, [carol])]}), admin.result
    invite_and_bootstrap(ad, email)
    ad.agent("enroll", "--email", email, "--profile", "smime-encryption")
    _, cert = delivered(ad, email, "smime-encryption")
    assert dc_certificates(samba_dc, email)[0] == der(cert)
    report = ad.autoenroll("sync", "reconcile").stdout
    assert dc_certificates(samba_dc, email)[0] == der(cert), report  # nesting counted: nothing revoked

    assert admin.modify(f"CN=platform-team,{GROUPS}", {"member": [(MODIFY_DELETE, [carol])]}), admin.result
    ad.autoenroll("sync", "reconcile", "--incremental")
    assert rows(ad, email, status="valid") == []
    assert {r.revocation_reason for r in rows(ad, email)} == {"affiliationChanged"}
    assert dc_certificates(samba_dc, email) == []


def test_bulk_provisioning_issues_to_the_members_of_a_nested_group_and_publishes(ad, samba_dc):
    email = "erin@autoenroll.test"
    out = ad.autoenroll("provision", "--group", f"CN=sales,{GROUPS}").stdout
    assert "1 members, 1 entitled, 0 already had one, 1 issued" in out and "1 published" in out, out
    (valid,) = rows(ad, email, status="valid")
    assert dc_certificates(samba_dc, email) == [valid.der]
    again = ad.autoenroll("provision", "--group", f"CN=sales,{GROUPS}").stdout
    assert "1 already had one, 0 issued" in again, again  # resumable: a second run issues nothing
    assert len(rows(ad, email)) == 1
