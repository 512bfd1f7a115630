"""How directory_sync reaches the directory safely, checked once at start-up: the server list of `url`,
TLS (ldaps:// or StartTLS, verified against `ca_file` or the system store, host names checked), the
service credentials (a password, from `password_file` or the configuration, or SASL EXTERNAL with a TLS
client certificate), and, when a TLS connection fails, what caused it.

libldap (GnuTLS on Debian) reports a failed handshake only as "Can't contact LDAP server"; `tls_failure`
repeats the handshake with Python's ssl module, with the same trust and host name, to name the cause.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from directory_sync.config import DEV_SERVICE_PASSWORD, LdapSettings
from registration_app.core.errors import ConfigError, DirectoryTlsFailed

MECHANISMS = ("", "EXTERNAL")  # "": simple bind with bind_dn and the password
_PORTS = {"ldap": 389, "ldaps": 636}
START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
# LDAPMessage { messageID 1, ExtendedRequest { requestName [0] START_TLS_OID } } (RFC 4511 4.14.1)
_START_TLS_REQUEST = b"\x30\x1d\x02\x01\x01\x77\x18\x80\x16" + START_TLS_OID


@dataclass(frozen=True)
class Server:
    url: str
    scheme: str  # ldap, ldaps, ldapi
    host: str
    port: int

    @property
    def local(self) -> bool:
        """On this machine: ldapi://, or a loopback address (or the name localhost)."""
        if self.scheme == "ldapi":
            return True
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Credentials:
    """How connections authenticate, resolved once (the password read from its file)."""

    mechanism: str  # "" (simple) or "EXTERNAL"
    bind_dn: str
    password: str = field(repr=False)


def servers(url: str) -> list[Server]:
    """The servers of `url`: one URL, or several separated by spaces or commas, tried in order."""
    found = []
    for item in url.replace(",", " ").split():
        parts = urlsplit(item)
        scheme = parts.scheme.lower()
        if scheme not in ("ldap", "ldaps", "ldapi"):
            raise ConfigError(f"setting ldap.url: {item!r} is not an ldap://, ldaps:// or ldapi:// URL")
        try:
            port = parts.port or _PORTS.get(scheme, 0)
        except ValueError:
            raise ConfigError(f"setting ldap.url: {item!r} has an invalid port") from None
        found.append(Server(url=item, scheme=scheme, host=parts.hostname or "", port=port))
    if not found:
        raise ConfigError("setting ldap.url is empty")
    return found


def uses_tls(settings: LdapSettings) -> bool:
    return settings.start_tls or any(s.scheme == "ldaps" for s in servers(settings.url))


def check_settings(settings: LdapSettings) -> Credentials:
    """Refuse, at start-up, what would send the service credentials unprotected or could not work;
    return the credentials to bind with. ConfigError names the setting."""
    listed = servers(settings.url)
    mechanism = settings.sasl_mechanism.upper()
    if mechanism not in MECHANISMS:
        raise ConfigError(f"setting ldap.sasl_mechanism: {settings.sasl_mechanism!r} is not supported "
                          "(\"\" for a simple bind, or \"EXTERNAL\" with a TLS client certificate)")
    if settings.start_tls and any(s.scheme == "ldaps" for s in listed):
        raise ConfigError("setting ldap.start_tls: StartTLS is for ldap:// URLs; ldaps:// already speaks TLS")
    for name in ("ca_file", "client_cert_file", "client_key_file"):
        path = getattr(settings, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"setting ldap.{name}: {path} does not exist")
    if bool(settings.client_cert_file) != bool(settings.client_key_file):
        raise ConfigError("settings ldap.client_cert_file and ldap.client_key_file go together")
    unprotected = [s for s in listed if s.scheme == "ldap" and not settings.start_tls]
    if mechanism == "EXTERNAL":
        if not settings.client_cert_file:
            raise ConfigError("setting ldap.sasl_mechanism = \"EXTERNAL\" needs ldap.client_cert_file and "
                              "ldap.client_key_file (the service's TLS client certificate)")
        if unprotected:
            raise ConfigError(f"SASL EXTERNAL needs TLS: {unprotected[0].url} is plain LDAP; use ldaps:// "
                              "or start_tls = true")
        return Credentials(mechanism, "", "")
    password = read_password(settings)
    remote = [s for s in listed if not s.local]
    if remote and password == DEV_SERVICE_PASSWORD:
        raise ConfigError(f"the built-in development password is refused for {remote[0].url}, which is not on "
                          "this machine: give the service account's password in ldap.password_file")
    exposed = [s for s in unprotected if not s.local]
    if exposed and not settings.insecure_plaintext:
        raise ConfigError(f"refusing a simple bind in plaintext to {exposed[0].url}: use ldaps:// or "
                          "start_tls = true (or set insecure_plaintext = true to send the password unprotected)")
    return Credentials(mechanism, settings.bind_dn, password)


def read_password(settings: LdapSettings) -> str:
    """The service password: the first line of `password_file` (a file only its owner may read), else
    `password`. Its text is never put in a message."""
    if not settings.password_file:
        return settings.password
    if settings.password != DEV_SERVICE_PASSWORD:
        raise ConfigError("settings ldap.password and ldap.password_file: give one of them, not both")
    path = Path(settings.password_file)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"setting ldap.password_file: cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"setting ldap.password_file: {path} is not a file")
        if info.st_mode & 0o077:
            raise ConfigError(f"setting ldap.password_file: {path} is open to other users (mode "
                              f"{info.st_mode & 0o777:o}); chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(4096)
    finally:
        os.close(fd)
    lines = raw.decode("utf-8", "strict").splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"setting ldap.password_file: {path} is empty")
    return lines[0]


def ca_file(settings: LdapSettings) -> str:
    """The CA certificates that verify the directory: `ca_file`, else the system store."""
    if settings.ca_file:
        return settings.ca_file
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.openssl_cafile or "/etc/ssl/certs/ca-certificates.crt"


def tls_failure(settings: LdapSettings, timeout: float) -> DirectoryTlsFailed | None:
    """Why TLS to the servers of `url` fails, as the error to raise; None if no server could be
    reached at all (then the directory is down, not misconfigured) or the handshake succeeds here."""
    for server in servers(settings.url):
        if server.scheme == "ldapi":
            continue
        cause = _handshake_failure(settings, server, timeout)
        if cause is not None:
            return cause
    return None


def _handshake_failure(settings: LdapSettings, server: Server, timeout: float) -> DirectoryTlsFailed | None:
    try:
        sock = socket.create_connection((server.host, server.port), timeout=timeout)
    except OSError:
        return None
    with sock:
        if server.scheme == "ldap":
            refused = _start_tls(sock)
            if refused is not None:
                return DirectoryTlsFailed(f"The LDAP server {server.url} refused StartTLS ({refused})",
                                          cause="starttls_refused", server=server.url)
        context = ssl.create_default_context(cafile=ca_file(settings))
        # libldap checks a URL naming localhost against this machine's own name: do as it does.
        name = socket.gethostname() if server.host.lower() == "localhost" else server.host
        try:
            with context.wrap_socket(sock, server_hostname=name):
                return None
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or str(exc)
            if exc.verify_code == 62 or "mismatch" in reason.lower():  # X509_V_ERR_HOSTNAME_MISMATCH
                return DirectoryTlsFailed(
                    f"The LDAP server {server.url} presented a certificate for another name ({reason}); "
                    "the URL must name a host the certificate lists", cause="name_mismatch", server=server.url)
            where = f"ldap.ca_file {settings.ca_file}" if settings.ca_file else "the system's CA store"
            return DirectoryTlsFailed(
                f"The LDAP server {server.url} presented a certificate that does not verify against {where} "
                f"({reason})", cause="certificate_unverified", server=server.url)
        except (ssl.SSLError, OSError) as exc:
            return DirectoryTlsFailed(f"The TLS handshake with the LDAP server {server.url} failed ({exc})",
                                      cause="handshake_failed", server=server.url)


def _start_tls(sock: socket.socket) -> str | None:
    """Send the StartTLS request; None if the server agreed, else what it said."""
    try:
        sock.sendall(_START_TLS_REQUEST)
        answer = _read_message(sock)
    except OSError as exc:
        return f"no answer: {exc}"
    code, message = _extended_result(answer)
    return None if code == 0 else f"result {code}: {message}" if message else f"result {code}"


def _read_message(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data
    head = exactly(2)
    length = head[1]
    if length & 0x80:
        length = int.from_bytes(exactly(length & 0x7F), "big")
    return exactly(length)


def _ber(data: bytes, at: int) -> tuple[int, bytes, int]:
    """(tag, value, offset after it) of the BER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    return tag, data[at:at + length], at + length


def _extended_result(message: bytes) -> tuple[int, str]:
    """(resultCode, diagnosticMessage) of an ExtendedResponse's content (messageID first)."""
    try:
        _, _, at = _ber(message, 0)  # messageID
        _, response, _ = _ber(message, at)  # [APPLICATION 24]
        _, code, at = _ber(response, 0)
        _, _, at = _ber(response, at)  # matchedDN
        _, diagnostic, _ = _ber(response, at)
        return int.from_bytes(code, "big"), diagnostic.decode("utf-8", "replace")
    except IndexError:
        return -1, "malformed answer"
