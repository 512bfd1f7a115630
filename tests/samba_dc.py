"""A real Active Directory domain controller for the tests: Samba AD DC (Debian `samba`), provisioned in a
temporary folder and run on loopback inside a private network namespace that the test run makes itself.

Why a namespace: a DC's LDAP ports are fixed (389, 636, 3268, 3269), and several test runs share this
machine. `NetworkNamespace` is a fresh one (made by `unshare --net`, loopback up); the DC runs in it,
and so does whatever must reach it: `NetworkNamespace.entered()` moves the *calling thread* (pytest's
main thread) into it with setns(2), so that every socket that thread opens (python-ldap, requests) and
every process it starts (gunicorn, openssl, gpgsm's dirmngr) is in the namespace too, and moves it back
after. Only the network namespace is switched (allowed in a threaded process); threads started earlier
and sockets opened earlier stay where they were, so nothing else of the session is disturbed as long
as no fixture that starts a server elsewhere (slapd, PostgreSQL) is first built while inside.

The DC serves LDAPS with a certificate this module issues (SAN DNS:localhost, IP:127.0.0.1), simple
binds over plain LDAP are refused (Samba's default, as on Windows), and the directory holds:

  OU=People   alice (in platform-team), bob (in no group), carol (in smime-users directly),
              dave (in no group), erin (in sales)
  OU=Groups   smime-users  >  engineering  >  platform-team   (alice: two levels under smime-users)
              smime-users  >  sales
  CN=Users    svc-autoenroll: may read, and write userCertificate of user objects under OU=People
              only (one ACE, `samba-tool dsacl set`), and create and write the CA object under
              CN=Certification Authorities,CN=Public Key Services,CN=Services,CN=Configuration.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.platform import eventually

REALM, DOMAIN = "AUTOENROLL.TEST", "AUTOENROLL"
BASE = "DC=autoenroll,DC=test"
PEOPLE, GROUPS = f"OU=People,{BASE}", f"OU=Groups,{BASE}"
ADMIN_PASSWORD = "Adm1n-Pass-Test!"
SERVICE = "svc-autoenroll"
SERVICE_DN = f"CN={SERVICE},CN=Users,{BASE}"
SERVICE_PASSWORD = "Svc-Pass-Test-1!"
CA_CONTAINER = f"CN=Certification Authorities,CN=Public Key Services,CN=Services,CN=Configuration,{BASE}"
# schemaIDGUIDs of the AD schema (the same in every forest).
USER_CERTIFICATE_GUID = "bf967a7f-0de6-11d0-a285-00aa003049e2"
USER_CLASS_GUID = "bf967aba-0de6-11d0-a285-00aa003049e2"
CERTIFICATION_AUTHORITY_GUID = "3fdfee50-47f4-11d1-a9c3-0000f80367c1"
USERS = {"alice": "Alice Liddell", "bob": "Bob Builder", "carol": "Carol Danvers", "dave": "Dave Lister",
         "erin": "Erin Brockovich"}
CLONE_NEWNET = 0x40000000


def available() -> bool:
    return bool(shutil.which("samba") or os.path.exists("/usr/sbin/samba")) and bool(shutil.which("samba-tool")) \
        and bool(shutil.which("unshare")) and os.geteuid() == 0


class NetworkNamespace:
    """A private network namespace with loopback up, held open by a file descriptor of this process."""

    def __init__(self) -> None:
        holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "up", "unshare --net failed"
            self.fd = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)  # keeps the namespace alive
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        self._libc = ctypes.CDLL(None, use_errno=True)

    @contextmanager
    def entered(self):
        """The calling thread in the namespace for the block, back in its own after."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self._setns(self.fd)
            try:
                yield self
            finally:
                self._setns(own)
        finally:
            os.close(own)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns: {os.strerror(errno)}")

    def close(self) -> None:
        os.close(self.fd)


def issue_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and the DC's server certificate (localhost, 127.0.0.1): (ca.pem, cert.pem, key.pem)."""
    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Samba DC Test TLS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dc1.autoenroll.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("dc1.autoenroll.test"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "tls-ca.pem", folder / "tls-cert.pem", folder / "tls-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].touch(mode=0o600)
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class SambaDC:
    """A provisioned domain (see the module docstring), started and stopped inside `namespace`."""

    url = "ldaps://127.0.0.1"  # verified against the IP address in the certificate

    def __init__(self, folder: Path, namespace: NetworkNamespace) -> None:
        self.folder = folder
        self.target = folder / "dc"
        self.namespace = namespace
        self.process: subprocess.Popen | None = None
        self.ca_file, self.cert_file, self.key_file = issue_tls(folder)

    @property
    def smb_conf(self) -> Path:
        return self.target / "etc" / "smb.conf"

    def tool(self, *args: str) -> str:
        """samba-tool on the database directly (no server needed: used before the DC starts)."""
        result = subprocess.run(["samba-tool", *args, "-s", str(self.smb_conf),
                                 "-H", str(self.target / "private" / "sam.ldb")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def provision(self) -> None:
        """The domain, with --use-rfc2307 and no DNS, its TLS files, and the entries of the docstring (~8 s)."""
        result = subprocess.run(
            ["samba-tool", "domain", "provision", f"--realm={REALM}", f"--domain={DOMAIN}", "--server-role=dc",
             "--dns-backend=NONE", "--use-rfc2307", f"--adminpass={ADMIN_PASSWORD}", f"--targetdir={self.target}",
             "--host-name=dc1", "--host-ip=127.0.0.1", "--option=interfaces=lo 127.0.0.1",
             "--option=bind interfaces only=yes", "--option=server services = ldap",
             f"--option=log file = {self.folder / 'samba.log'}",
             # --targetdir moves every folder but the pid file's (/run/samba): two DCs at once, of two
             # suites on one machine, each keep their own
             f"--option=pid directory = {self.target / 'run'}",
             "--option=tls enabled = yes", f"--option=tls keyfile = {self.key_file}",
             f"--option=tls certfile = {self.cert_file}", f"--option=tls cafile = {self.ca_file}"],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout, result.stderr)
        self.tool("ou", "create", PEOPLE)
        self.tool("ou", "create", GROUPS)
        self.tool("user", "create", SERVICE, SERVICE_PASSWORD)
        for name, full in USERS.items():
            given, surname = full.split()
            self.tool("user", "create", name, f"{given}-Pass-1!", "--userou=OU=People", f"--given-name={given}",
                      f"--surname={surname}", f"--mail-address={name}@autoenroll.test")
        for group in ("smime-users", "engineering", "platform-team", "sales"):
            self.tool("group", "add", group, "--groupou=OU=Groups")
        self.tool("group", "addmembers", "smime-users", "engineering,carol,sales")
        self.tool("group", "addmembers", "sales", "erin")
        self.tool("group", "addmembers", "engineering", "platform-team")
        self.tool("group", "addmembers", "platform-team", "alice")
        sid = self.service_sid()
        # userCertificate of user objects under OU=People, nothing else (reading is every user's right).
        self.tool("dsacl", "set", f"--objectdn={PEOPLE}",
                  f"--sddl=(OA;CIIO;WP;{USER_CERTIFICATE_GUID};{USER_CLASS_GUID};{sid})")
        # The CA object: create it in the container AD clients read roots from, then write its values.
        self.tool("dsacl", "set", f"--objectdn={CA_CONTAINER}",
                  f"--sddl=(OA;;CC;{CERTIFICATION_AUTHORITY_GUID};;{sid})")
        self.tool("dsacl", "set", f"--objectdn={CA_CONTAINER}",
                  f"--sddl=(OA;CIIO;WP;;{CERTIFICATION_AUTHORITY_GUID};{sid})")

    def service_sid(self) -> str:
        out = self.tool("user", "show", SERVICE, "--attributes=objectSid")
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("objectSid:"))

    def start(self) -> None:
        """The DC in the namespace; returns once LDAPS answers with our certificate (about 1 s)."""
        (self.target / "run").mkdir(exist_ok=True)
        with self.namespace.entered():
            self.process = subprocess.Popen(
                ["samba", "-s", str(self.smb_conf), "--foreground", "--no-process-group", "-M", "single"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            context = ssl.create_default_context(cafile=str(self.ca_file))

            def serving() -> bool:
                if self.process.poll() is not None:
                    raise AssertionError(f"samba exited ({self.process.returncode}): {self.log()}")
                try:
                    with socket.create_connection(("127.0.0.1", 636), timeout=2) as raw, \
                            context.wrap_socket(raw, server_hostname="localhost"):
                        return True
                except OSError:
                    return False

            try:
                eventually(serving, timeout=60, what="samba to serve LDAPS")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {self.log()}") from None

    def log(self) -> str:
        path = self.folder / "samba.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory):
    """One provisioned DC for the session (provisioned in about 8 s, started in about 1 s: not worth
    caching), in a network namespace of its own. Tests enter it with `samba_dc.namespace.entered()`."""
    if not available():
        pytest.skip("needs Debian samba (make debs installs it) and root (a private network namespace)")
    namespace = NetworkNamespace()
    dc = SambaDC(tmp_path_factory.mktemp("samba"), namespace)
    try:
        dc.provision()
        dc.start()
        yield dc
    finally:
        dc.stop()
        namespace.close()
