"""Another CA than ours (a partner CA, a national eID) for tests: its users' certificates name an HTTP CRL
distribution point, and a small HTTP server on loopback serves the CRLs it signs (the real component a
revocation checker talks to, not a mock)."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from directory_sync.slapd import free_port
from bench import pki


class CrlServer:
    """Serves `crls[path]` (DER) over HTTP on 127.0.0.1; counts the GETs of each path; `status[path]`
    makes it answer with that HTTP status instead."""

    def __init__(self) -> None:
        self.crls: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                with server._lock:
                    server.gets[self.path] = server.gets.get(self.path, 0) + 1
                    body, status = server.crls.get(self.path), server.status.get(self.path)
                if status is not None or body is None:
                    self.send_response(status or 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 (the base class's name)
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="crl-server", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fetches(self, path: str) -> int:
        with self._lock:
            return self.gets.get(path, 0)

    def __enter__(self) -> CrlServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dead_url(path: str = "/ca.crl") -> str:
    """An HTTP URL on loopback where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}{path}"


@dataclass
class ExternalCA:
    """A root CA of another organisation whose certificates point at `crl_url`."""

    ca: pki.Issued
    crl_url: str
    revoked: dict[int, datetime] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str, crl_url: str, *, key_type: str = "ec") -> ExternalCA:
        return cls(pki.make_ca(name, key_type=key_type), crl_url)

    @property
    def path(self) -> str:
        return "/" + self.crl_url.split("/", 3)[3]

    def user(self, email: str, *, key_type: str = "ec", crl_url: str | list[str] | None = None) -> pki.Issued:
        """An S/MIME signature certificate for `email`, with this CA's CRL distribution point (or the
        `crl_url` given: a list for several, "" for none)."""
        urls = [self.crl_url] if crl_url is None else [crl_url] if isinstance(crl_url, str) and crl_url else \
            list(crl_url or [])
        key = pki.new_key(key_type)
        builder = self._builder(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, email)]), key, urls)
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([pki.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        )
        return pki.Issued(builder.sign(self.ca.key, hashes.SHA256()), key)

    def intermediate(self, name: str, crl_url: str) -> ExternalCA:
        """An issuing CA under this one, listed on this CA's CRL when revoked; its users point at `crl_url`."""
        key = pki.new_key()
        builder = self._builder(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]), key,
                                [self.crl_url])
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        )
        return ExternalCA(pki.Issued(builder.sign(self.ca.key, hashes.SHA256()), key), crl_url)

    def _builder(self, subject: x509.Name, key, urls: list[str]) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 | 1 << 64)
            .not_valid_before(pki.NOW - pki.DAY)
            .not_valid_after(pki.NOW + 365 * pki.DAY)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                self.ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
        )
        if urls:
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u)], relative_name=None, reasons=None, crl_issuer=None)
                for u in urls]), critical=False)
        return builder

    def crl(self, *, now: datetime | None = None, next_update: timedelta = timedelta(days=7),
            signer: pki.Issued | None = None) -> bytes:
        """A DER CRL listing `revoked`, signed by this CA (or by `signer`, to forge one)."""
        now = now or pki.NOW
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.cert.subject)
            .last_update(now - timedelta(minutes=1))
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(len(self.revoked) + 1), critical=False)
        )
        for serial, when in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        key = (signer or self.ca).key
        return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)

    def revoke(self, cert: pki.Issued) -> None:
        self.revoked[cert.cert.serial_number] = pki.NOW - pki.DAY

    def publish(self, server: CrlServer, **kwargs) -> None:
        server.crls[self.path] = self.crl(**kwargs)
