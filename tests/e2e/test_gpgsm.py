"""A mail client that reads only the first value of userCertificate;binary: GnuPG's gpgsm, fetching through
dirmngr from our slapd, for a user whose entry already started with another issuer's signing-only
certificate. After the enrollment (RSA profile, legacy PKCS#12, which gpgsm 2.2 can import) our
encryption certificate is what dirmngr hands over, gpgsm encrypts to it, and the delivered PKCS#12,
imported into gpgsm, decrypts."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates
from tests.ldap_admin import MODIFY_ADD

pytestmark = pytest.mark.skipif(not (shutil.which("gpgsm") and shutil.which("dirmngr")),
                                reason="gpgsm/dirmngr not installed (Debian gpgsm and dirmngr; `make debs` installs them)")
PEOPLE = "ou=people,dc=example,dc=org"


def foreign_signing_certificate(email: str) -> bytes:
    """A signing-only certificate for `email` from a CA that is not ours (as a partner PKI would issue)."""
    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Partner Test CA")])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, email)]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


class Gpgsm:
    """gpgsm with a private GNUPGHOME whose dirmngr asks our slapd (anonymously) for certificates."""

    def __init__(self, home, ldap_url: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = {**os.environ, **(env or {}), "GNUPGHOME": str(home)}  # dirmngr inherits it
        home.mkdir(mode=0o700)
        host_port = ldap_url.split("//", 1)[1].rstrip("/")
        (home / "dirmngr.conf").write_text(f"ldapserver {host_port}:::{PEOPLE}\n")
        # The CRL and the policy are not what this test is about (CRLs: tests/e2e/test_directory.py).
        (home / "gpgsm.conf").write_text("disable-crl-checks\ndisable-policy-checks\n")
        (home / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["gpgsm", "--batch", *args], input=stdin, capture_output=True, text=True,
                                env=self.env, timeout=120)
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def trust(self, ca_pem) -> None:
        """Import our CA certificate and trust it as a root for S/MIME (trustlist.txt, flag S)."""
        self("--import", str(ca_pem))
        colons = self("--with-colons", "--fingerprint", "--list-keys").stdout
        fingerprints = [line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")]
        (self.home / "trustlist.txt").write_text("".join(f"{fp} S relax\n" for fp in fingerprints))

    def locate(self, email: str) -> str:
        """What a mail client does for an unknown recipient: ask dirmngr (which passes on the first value
        of userCertificate;binary), then keep what it found. Returns the certificate's fingerprint."""
        colons = self("--with-colons", "--list-external-keys", email).stdout
        found = [line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")]
        assert len(found) == 1, colons
        exported = self("--armor", "--export", found[0]).stdout  # stored as ephemeral by the lookup
        self("--import", stdin=exported)  # ...kept for good
        return found[0]

    def stop(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True, timeout=60)


@pytest.fixture
def gpgsm(tmp_path, platform):
    client = Gpgsm(tmp_path / "gnupg", platform.ldap_url)
    try:
        client.trust(platform.data / "ca.pem")
        yield client
    finally:
        client.stop()


def test_gpgsm_finds_our_encryption_certificate_before_a_foreign_one_and_the_pkcs12_decrypts(
        platform, gpgsm, ldap_admin, new_user, tmp_path):
    dn, email = new_user(groups=("smime-users",))
    foreign = foreign_signing_certificate(email)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]}), ldap_admin.result
    invite_and_bootstrap(platform, email)
    assert ldap_certificates(platform, email)[0] == foreign  # no encryption certificate of ours yet: left first
    out = platform.agent("enroll", "--email", email, "--profile", "smime-encryption", "--legacy").stdout
    assert "published in the directory" in out

    store = platform.data / "agent-store" / email
    p12 = next(store.glob("smime-encryption-*.p12"))
    delivered = x509.load_pem_x509_certificates(p12.with_suffix(".pem").read_bytes())[0]
    published = ldap_certificates(platform, email)
    assert published[0] == delivered.public_bytes(Encoding.DER)
    assert foreign in published[1:]  # kept, byte for byte, after ours

    fingerprint = gpgsm.locate(email)
    assert fingerprint == delivered.fingerprint(hashes.SHA1()).hex().upper()
    (tmp_path / "message.txt").write_text("the quarterly numbers\n")
    gpgsm("--encrypt", "-r", email, "--output", str(tmp_path / "message.p7m"), str(tmp_path / "message.txt"))

    # The user's mail client imports the delivered PKCS#12 (3DES bags) and reads the message.
    password = p12.with_suffix(".pass").read_text().strip()
    gpgsm("--pinentry-mode", "loopback", "--passphrase-fd", "0", "--import", str(p12), stdin=password + "\n")
    decrypted = gpgsm("--pinentry-mode", "loopback", "--passphrase-fd", "0", "--decrypt",
                      "--output", str(tmp_path / "out.txt"), str(tmp_path / "message.p7m"), stdin=password + "\n")
    assert (tmp_path / "out.txt").read_text() == "the quarterly numbers\n", decrypted.stderr
