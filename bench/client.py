"""A lean agent for load and attack traffic: one keep-alive mTLS connection (http.client), the JWS signed
inline with the agent's own signer (registration_app.agent.jws), and raw access for hostile bodies."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from registration_app.agent.jws import sign_user_request, thumbprint

JOSE = {"Content-Type": "application/jose+json"}


class PeerSocket:
    """What gunicorn puts in `environ["gunicorn.socket"]` as far as the server reads it: the TLS peer's
    certificate. For in-process requests (Flask's test client) that go through the server's own path."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        if not binary_form:
            raise ValueError("the server reads the peer certificate as DER only")
        return self.der


def peer_environ(der: bytes) -> dict:
    """`environ_base` for Flask's test client: a request on a TLS connection with this client certificate."""
    return {"gunicorn.socket": PeerSocket(der)}


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes
    seconds: float

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self):
        return json.loads(self.body)


class AgentConnection:
    def __init__(self, base_url: str, *, ca: Path, cert: Path | None, key: Path | None, timeout: float = 60):
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 443
        self.context = ssl.create_default_context(cafile=str(ca))
        self.thumbprint = ""
        if cert is not None:
            self.context.load_cert_chain(str(cert), str(key))
            der = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(Encoding.DER)
            self.thumbprint = thumbprint(der)
        self.timeout = timeout
        self.conn: http.client.HTTPSConnection | None = None
        self.resend_on_reset = True  # once, for a kept-alive connection the server closed meanwhile
        self.next_nonce: str | None = None  # the last answer's Replay-Nonce, as the real agent uses it

    @classmethod
    def for_platform(cls, platform, *, cert: Path | None = None, key: Path | None = None,
                     anonymous: bool = False) -> AgentConnection:
        if anonymous:
            return cls(platform.url, ca=platform.tls_ca, cert=None, key=None)
        return cls(platform.url, ca=platform.tls_ca, cert=cert or platform.agent_cert, key=key or platform.agent_key)

    def url(self, path: str) -> str:
        return f"{self.base_url}/api/v1/{path}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        """`path` is absolute ("/api/v1/enroll"). One reconnect if a kept-alive connection was closed."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                        timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, ssl.SSLEOFError):
                self.close()
                if attempt or not self.resend_on_reset:
                    raise
                continue
            if response.will_close:
                self.close()
            self.next_nonce = response.getheader("Replay-Nonce") or None
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                         time.perf_counter() - started)
        raise AssertionError("unreachable")

    def nonce(self) -> str:
        reply = self.request("GET", "/api/v1/nonce")
        if reply.status != 200:
            raise RuntimeError(f"nonce: HTTP {reply.status} {reply.body[:200]!r}")
        return reply.json()["nonce"]

    def sign(self, payload: dict, user, *, path: str = "enroll", nonce: str | None = None,
             url: str | None = None, agent_thumbprint: str | None = None) -> bytes:
        return sign_user_request(payload, key=user.key, chain=list(user.chain),
                                 nonce=nonce if nonce is not None else self.nonce(),
                                 url=url or self.url(path), agent_thumbprint=agent_thumbprint or self.thumbprint)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> Reply:
        return self.request("POST", f"/api/v1/{path}", body, headers or JOSE)

    def enroll(self, user, payload: dict) -> Reply:
        """A signed POST, with the nonce of the previous answer's Replay-Nonce as the real agent does
        (GET /nonce first when there is none); the reply's seconds cover both."""
        started = time.perf_counter()
        nonce, self.next_nonce = self.next_nonce, None
        reply = self.post("enroll", self.sign(payload, user, nonce=nonce))
        if reply.status == 400 and b"bad_nonce" in reply.body:  # expired meanwhile: once more, fresh
            reply = self.post("enroll", self.sign(payload, user))
        reply.seconds = time.perf_counter() - started
        return reply
