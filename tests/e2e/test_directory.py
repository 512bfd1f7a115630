"""The directory tells the truth, through the real server and command line: an LDAP outage delays
publication but loses nothing; leaving the group revokes (CRL in LDAP and over HTTP, openssl agrees);
bulk provisioning publishes one certificate each, once."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import uuid

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from directory_sync.slapd import PrivateSlapd
from registration_app.wiring import build_services
from registration_app.settings import load_settings
from tests.directory_sync.certs import cert as foreign_certificate
from bench.world import add_users
from bench.platform import SUITE_SETTINGS, eventually, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap
from tests.ldap_admin import MODIFY_ADD, MODIFY_DELETE, LdapAdmin

SMIME = "cn=smime-users,ou=groups,dc=example,dc=org"
PEOPLE = "ou=people,dc=example,dc=org"


def ldap_values(ldap_url: str, base: str, flt: str, attr: str) -> dict[str, list[bytes]]:
    """What anyone sees, read with ldapsearch (not our code): {dn: [values]}."""
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", ldap_url, "-b", base, flt, attr],
                         capture_output=True, text=True, check=True).stdout
    found: dict[str, list[bytes]] = {}
    dn = None
    for line in out.splitlines():
        if line.startswith("dn: "):
            dn = line[4:]
            found[dn] = []
        elif line.lower().startswith(attr.lower() + "::"):
            found[dn].append(base64.b64decode(line.split(":: ", 1)[1]))
    return found


def sync_status(platform) -> dict:
    return json.loads(platform.autoenroll("sync", "status").stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A private slapd and server platform (the session's are not disturbed), with 60 extra users."""
    slapd = PrivateSlapd(tmp_path_factory.mktemp("slapd-dir"))
    slapd.start()
    slapd.load_demo()
    dns = add_users(slapd, [f"e2e{i}" for i in range(60)])
    with Admin(slapd) as admin:
        assert admin.modify(SMIME, {"member": [(MODIFY_ADD, dns)]}), admin.result
    platform = make_platform(tmp_path_factory.mktemp("platform-dir"), slapd.url, **SUITE_SETTINGS)
    platform.start()
    services = build_services(load_settings(platform.config))
    try:
        yield slapd, platform, services, lambda: Admin(slapd), dns
    finally:
        services.close()
        platform.stop()
        slapd.stop()


class Admin:
    """cn=admin over a fresh connection (slapd restarts in these tests)."""

    def __init__(self, slapd) -> None:
        self.conn = LdapAdmin.for_slapd(slapd)

    def __enter__(self) -> LdapAdmin:
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.unbind()


def test_outage_delays_publication_and_loses_nothing(world):
    slapd, platform, services, admin, dns = world
    # Two users through the real server, end to end (signature by invitation, then encryption).
    real = ["alice@example.org", "carol@example.org"]
    for email in real:
        invite_and_bootstrap(platform, email)
        assert "published in the directory" in platform.agent(
            "enroll", "--email", email, "--profile", "smime-encryption-ec").stdout
    # 48 more through the in-process key authority while slapd is down (the RA would refuse them:
    # entitlement is read live), as bulk provisioning or a failure between checks and publication do.
    users = [services.directory.find_user(f"e2e{i}@example.org") for i in range(48)]
    from registration_app.authorities.key_authority import IssueRequest
    profile = services.settings.profiles["smime-encryption-ec"]
    slapd.stop()
    issued = {u.dn: services.key_authority.issue(IssueRequest(user=u, profile=profile, actor="test", password="pw"))
              for u in users}
    status = sync_status(platform)
    assert status["depth"] >= 48
    slapd.start()
    eventually(lambda: sync_status(platform)["depth"] == 0, timeout=40, step=0.3,
               what="the outbox to drain")  # the server's own outbox worker
    shown = ldap_values(platform.ldap_url, PEOPLE, "(mail=*)", "userCertificate;binary")
    for dn, done in issued.items():
        assert shown[dn] == [done.certificate.public_bytes(Encoding.DER)]  # there, once
    for email in real:
        entry = next(v for d, v in ldap_values(platform.ldap_url, PEOPLE, f"(mail={email})",
                                               "userCertificate;binary").items())
        assert len(entry) == len(set(entry)) == 2  # encryption + signature, none twice
    assert sync_status(platform)["depth"] == 0


def test_group_exit_reconcile_revokes_on_both_crls_and_keeps_foreign(world, tmp_path):
    slapd, platform, services, admin, dns = world
    dn = dns[50]
    email = "e2e50@example.org"
    from registration_app.authorities.key_authority import IssueRequest
    user = services.directory.find_user(email)
    issued = services.key_authority.issue(IssueRequest(
        user=user, profile=services.settings.profiles["smime-encryption-ec"], actor="test", password="pw"))
    services.publisher.drain(user_dn=dn)
    ours = issued.certificate.public_bytes(Encoding.DER)
    foreign = foreign_certificate("Someone Else's CA", email, encryption=True)
    with admin() as conn:
        assert conn.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]}), conn.result
        assert conn.modify(SMIME, {"member": [(MODIFY_DELETE, [dn])]}), conn.result

    dry = platform.autoenroll("sync", "reconcile", "--dry-run").stdout
    assert f"would revoke {issued.serial}" in dry
    assert ldap_values(platform.ldap_url, dn, "(objectClass=*)", "userCertificate;binary")[dn] == [ours, foreign]
    assert not services.ca.is_revoked(issued.certificate)

    out = platform.autoenroll("sync", "reconcile").stdout
    assert f"revoke {issued.serial}" in out and "not entitled" in out
    assert services.ca.is_revoked(issued.certificate)
    assert ldap_values(platform.ldap_url, dn, "(objectClass=*)", "userCertificate;binary")[dn] == [foreign]

    # The CRL in the CA entry (anyone may read it) and at the URL the certificate names.
    ca_dn = services.settings.ldap.ca_entry_dn
    ldap_crl = x509.load_der_x509_crl(
        ldap_values(platform.ldap_url, ca_dn, "(objectClass=*)", "certificateRevocationList;binary")[ca_dn][0])
    assert ldap_crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number) is not None
    dp = issued.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    url = dp[0].full_name[0].value
    assert url.startswith(platform.http_url)
    response = requests.get(url, timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/pkix-crl"
    assert "max-age=" in response.headers["Cache-Control"] and response.headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": response.headers["ETag"]}, timeout=5).status_code == 304
    http_crl = x509.load_der_x509_crl(response.content)
    assert http_crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number) is not None

    (tmp_path / "crl.der").write_bytes(response.content)
    subprocess.run(["openssl", "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-out", tmp_path / "crl.pem"],
                   check=True)
    (tmp_path / "cert.pem").write_bytes(issued.certificate.public_bytes(Encoding.PEM))
    ca_pem = platform.data / "ca.pem"
    check = subprocess.run(["openssl", "crl", "-in", tmp_path / "crl.pem", "-CAfile", ca_pem, "-noout"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "verify OK" in check.stdout + check.stderr
    verify = subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", tmp_path / "crl.pem", "-CAfile", ca_pem,
                             "-purpose", "smimeencrypt", tmp_path / "cert.pem"], capture_output=True, text=True)
    assert verify.returncode != 0 and "certificate revoked" in verify.stdout + verify.stderr

    # An operator's forced refresh: a new CRL number, in LDAP at once.
    number = http_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert f"CRL number {number + 1}:" in platform.autoenroll("crl", "--refresh").stdout
    ldap_crl = x509.load_der_x509_crl(
        ldap_values(platform.ldap_url, ca_dn, "(objectClass=*)", "certificateRevocationList;binary")[ca_dn][0])
    assert ldap_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1


def test_revoked_signature_certificate_is_refused_at_once(world):
    slapd, platform, services, admin, dns = world
    email = "dave@example.org"
    invite_and_bootstrap(platform, email)
    from registration_app.store.models import Certificate
    from sqlalchemy import select
    with services.db.transaction() as session:
        serial = session.execute(select(Certificate.serial).where(
            Certificate.email == email, Certificate.usage == "signature")).scalar_one()
    platform.autoenroll("revoke", serial, "--reason", "keyCompromise")
    result = platform.agent("enroll", "--email", email, "--profile", "smime-encryption-ec", check=False)
    assert result.returncode != 0 and "revoked" in result.stderr


def test_provision_group_publishes_one_each_then_none(world):
    slapd, platform, services, admin, dns = world
    tag = uuid.uuid4().hex[:6]
    bulk = add_users(slapd, [f"bulk{tag}-{i}" for i in range(300)])
    group = f"cn=bulk-{tag},ou=groups,dc=example,dc=org"
    with admin() as conn:
        assert conn.add(group, ["groupOfNames"], {"cn": f"bulk-{tag}", "member": bulk}), conn.result
        assert conn.modify(SMIME, {"member": [(MODIFY_ADD, bulk)]}), conn.result

    out = platform.autoenroll("provision", "--group", group, "--profile", "smime-encryption-ec").stdout
    assert "300 entitled" in out and "300 issued" in out and "300 published" in out
    shown = ldap_values(platform.ldap_url, PEOPLE, f"(uid=bulk{tag}-*)", "userCertificate;binary")
    assert len(shown) == 300 and all(len(v) == 1 for v in shown.values())
    again = platform.autoenroll("provision", "--group", group, "--profile", "smime-encryption-ec").stdout
    assert "0 issued" in again and "300 already had one" in again
    assert sync_status(platform)["depth"] == 0
    assert "audit log intact" in platform.autoenroll("audit", "verify").stdout


def test_agents_enrolling_at_once_are_told_the_truth_about_the_directory(world):
    """Six users' agents enroll at the same moment (the publications of one worker go together in one
    LDAP transaction when they meet): each agent's line about the directory is true when printed, and
    every certificate ends up first in its user's entry."""
    slapd, platform, _services, admin, _dns = world
    emails = []
    with admin() as conn:
        for _ in range(6):
            uid = "at-once-" + uuid.uuid4().hex[:8]
            dn = f"uid={uid},{PEOPLE}"
            assert conn.add(dn, ["inetOrgPerson", "pkiUser"], {"uid": uid, "cn": uid, "sn": "T",
                                                               "mail": f"{uid}@example.org"}), conn.result
            assert conn.modify(SMIME, {"member": [(MODIFY_ADD, [dn])]}), conn.result
            emails.append(f"{uid}@example.org")
    for email in emails:
        invite_and_bootstrap(platform, email)
    outputs: dict[str, str] = {}

    def enroll(email: str) -> None:
        outputs[email] = platform.agent("enroll", "--email", email, "--profile", "smime-encryption-ec").stdout

    agents = [threading.Thread(target=enroll, args=(email,)) for email in emails]
    for agent in agents:
        agent.start()
    for agent in agents:
        agent.join()

    for email in emails:
        pem = next((platform.data / "agent-store" / email).glob("smime-encryption-ec-*.pem")).read_bytes()
        delivered = x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER)
        shown = lambda: ldap_values(slapd.url, PEOPLE, f"(mail={email})", "userCertificate;binary")  # noqa: E731
        if "published in the directory" in outputs[email]:
            assert list(shown().values())[0][:1] == [delivered]
        else:
            assert "not in the directory yet" in outputs[email]
            eventually(lambda: list(shown().values())[0][:1] == [delivered], timeout=40, step=0.3,
                       what=f"{email}'s queued certificate in the directory")
