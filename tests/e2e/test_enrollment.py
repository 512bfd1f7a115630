"""A user's whole path through the real server: invite → bootstrap → enroll → LDAP → openssl."""

from __future__ import annotations

import base64
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import pytest

from registration_app.authorities.escrow_crypto import escrow_aad, open_private_key
from registration_app.wiring import key_store
from registration_app.settings import load_settings
from registration_app.store.models import Certificate, Escrow
from sqlalchemy import func, select

# Every test here runs twice: keys in the data folder's files, and every key in a SoftHSM2 token.
KEY_STORES = pytest.mark.parametrize("platform", ["files", "softhsm"], indirect=True, scope="session")


def ldap_certificates(platform, email: str) -> list[bytes]:
    """What a mail client sees: an anonymous search by mail (ldapsearch, not our code), over the
    platform's own transport to slapd."""
    out = platform.ldapsearch("-b", "ou=people,dc=example,dc=org", f"(mail={email})", "userCertificate;binary")
    return [base64.b64decode(line.split(":: ", 1)[1]) for line in out.splitlines()
            if line.lower().startswith("usercertificate;binary::")]



def invite_and_bootstrap(platform, email: str) -> None:
    code = platform.autoenroll("invite", email).stdout.strip()
    out = platform.agent("bootstrap", "--email", email, "--code", code).stdout
    assert "signature certificate for" in out


def test_encryption_certificate_end_to_end(platform_over, new_user, tmp_path):
    """The same path over each transport to slapd (tests/e2e/conftest.py): ldap:// on loopback, ldaps://
    and StartTLS, each verified against the CA that issued slapd's certificate; and with every key in a
    SoftHSM2 token."""
    platform = platform_over
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(platform, email)
    out = platform.agent("enroll", "--email", email, "--profile", "smime-encryption").stdout
    assert "published in the directory" in out
    store = platform.data / "agent-store" / email
    p12 = next(store.glob("smime-encryption-*.p12"))
    password = p12.with_suffix(".pass")
    assert p12.stat().st_mode & 0o777 == 0o600 and password.stat().st_mode & 0o777 == 0o600

    # The directory shows the certificate to anyone: the encryption certificate comes first.
    published = ldap_certificates(platform, email)
    cert_pem = p12.with_suffix(".pem").read_bytes()
    delivered = x509.load_pem_x509_certificates(cert_pem)[0]
    assert published[0] == delivered.public_bytes(Encoding.DER)
    (tmp_path / "from-ldap.der").write_bytes(published[0])
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "from-ldap.der",
                    "-out", tmp_path / "from-ldap.pem"], check=True)

    # Anyone encrypts to the published certificate; the delivered PKCS#12 decrypts it.
    (tmp_path / "msg.txt").write_text("the quarterly numbers\n")
    subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", tmp_path / "msg.txt",
                    "-out", tmp_path / "msg.p7m", tmp_path / "from-ldap.pem"], check=True)
    subprocess.run(["openssl", "pkcs12", "-in", p12, "-passin", f"file:{password}", "-nodes", "-nocerts",
                    "-out", tmp_path / "key.pem"], check=True, capture_output=True)
    subprocess.run(["openssl", "cms", "-decrypt", "-in", tmp_path / "msg.p7m", "-inkey", tmp_path / "key.pem",
                    "-recip", tmp_path / "from-ldap.pem", "-out", tmp_path / "out.txt"], check=True)
    assert (tmp_path / "out.txt").read_text() == "the quarterly numbers\n"

    # The escrowed key opens with the KRA key and matches the certificate.
    serial = format(delivered.serial_number, "x")
    with platform.transaction() as session:
        row = session.execute(select(Escrow).where(Escrow.serial == serial)).scalar_one()
    kra_key = key_store(load_settings(platform.config)).kra_storage_key()  # the file, or the token's unwrap
    escrowed = open_private_key(row.blob, kra_key, escrow_aad(delivered.serial_number, email, "smime-encryption"))
    spki = PublicFormat.SubjectPublicKeyInfo
    assert escrowed.public_key().public_bytes(Encoding.DER, spki) == \
        delivered.public_key().public_bytes(Encoding.DER, spki)

    # Decision, escrow, issuance and publication are each one row of the verified audit chain.
    from registration_app.store.models import AuditEvent
    with platform.transaction() as session:
        events = {e for (e,) in session.execute(select(AuditEvent.event).where(AuditEvent.subject == email))}
    assert {"enrollment.allowed", "key.escrowed", "certificate.issued", "directory.published"} <= events
    assert "audit log intact" in platform.autoenroll("audit", "verify").stdout


@KEY_STORES
def test_user_not_entitled_gets_403_and_nothing_is_issued(platform, ldap_admin, new_user):
    """A user who was entitled when invited and bootstrapped, and then left the group (bob, in no
    group, is refused earlier: at invite, tests/e2e/test_entitlement.py)."""
    dn, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(platform, email)
    assert ldap_admin.modify("cn=smime-users,ou=groups,dc=example,dc=org", {"member": [("MODIFY_DELETE", [dn])]})
    before = ldap_certificates(platform, email)
    result = platform.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    assert result.returncode == 1
    assert "not_entitled" in result.stderr and "smime-encryption" in result.stderr
    with platform.transaction() as session:
        assert session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email, Certificate.profile == "smime-encryption")).scalar_one() == 0
        assert session.execute(select(func.count()).select_from(Escrow).where(
            Escrow.email == email)).scalar_one() == 0
    assert ldap_certificates(platform, email) == before
    from registration_app.store.models import AuditEvent
    with platform.transaction() as session:
        denied = session.execute(select(AuditEvent.detail).where(
            AuditEvent.subject == email, AuditEvent.event == "request.denied")).scalars().all()
    assert any(d["code"] == "not_entitled" for d in denied)
    assert "audit log intact" in platform.autoenroll("audit", "verify").stdout


@pytest.mark.parametrize("platform", ["softhsm"], indirect=True, scope="session")
def test_keys_in_the_token_sign_what_openssl_verifies_and_never_leave_it(platform, softhsm, new_user, tmp_path):
    """Every key in SoftHSM2: openssl verifies the user's chain, the CRL after a revocation (signed in the
    token) and a TLS client certificate from the token's TLS CA; pkcs11-tool shows the keys sensitive and
    never extractable; the data folder holds no CA, TLS CA or KRA key file."""
    from tests.softhsm import access_of, private_key_blocks, usage_of
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(platform, email)
    platform.agent("enroll", "--email", email, "--profile", "smime-encryption")
    with platform.transaction() as session:
        serial, der = session.execute(select(Certificate.serial, Certificate.der).where(
            Certificate.email == email, Certificate.profile == "smime-encryption")).one()
    cert = tmp_path / "user.pem"
    cert.write_bytes(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
    ca = str(platform.data / "ca.pem")
    verified = subprocess.run(["openssl", "verify", "-CAfile", ca, "-purpose", "smimeencrypt", cert],
                              capture_output=True, text=True)
    assert verified.returncode == 0 and "OK" in verified.stdout

    platform.autoenroll("revoke", serial, "--reason", "keyCompromise")
    import requests
    (tmp_path / "ca.crl").write_bytes(requests.get(platform.http_url + "/crl/ca.crl", timeout=10).content)
    crl = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", tmp_path / "ca.crl", "-CAfile", ca, "-noout",
                          "-text"], capture_output=True, text=True)
    assert crl.returncode == 0 and "verify OK" in crl.stderr + crl.stdout
    assert serial.upper().lstrip("0") in crl.stdout.replace(":", "").upper()
    subprocess.run(["openssl", "crl", "-inform", "DER", "-in", tmp_path / "ca.crl", "-out", tmp_path / "crl.pem"],
                   check=True)
    revoked = subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", tmp_path / "crl.pem", "-CAfile", ca,
                              cert], capture_output=True, text=True)
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr

    platform.autoenroll("client-cert", "agent2.example.org", "--out", str(tmp_path))
    tls = subprocess.run(["openssl", "verify", "-CAfile", platform.data / "tls-ca.pem", "-purpose", "sslclient",
                          tmp_path / "agent2.example.org.pem"], capture_output=True, text=True)
    assert tls.returncode == 0 and "OK" in tls.stdout

    keys = private_key_blocks(softhsm.list_objects(platform.data.name, platform.data / "token.pin"))
    assert sorted(keys) == ["autoenroll-ca", "autoenroll-kra", "autoenroll-tls-ca"]
    for label, block in keys.items():
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= access_of(block), label
        assert "extractable" not in access_of(block)
    assert usage_of(keys["autoenroll-kra"]) == {"decrypt", "unwrap"}
    assert not [p.name for p in platform.data.rglob("*.key") if p.name in ("ca.key", "kra.key", "tls-ca.key")]
