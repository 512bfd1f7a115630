"""HTTP client of the registration server: one keep-alive mTLS session with the agent certificate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .jws import mac_bootstrap_request, sign_user_request, thumbprint


class AgentError(Exception):
    """A refusal or failure, with the server's problem document when there is one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, body=None):
        super().__init__(message)
        self.status, self.code, self.body = status, code, body


@dataclass(frozen=True)
class AgentConfig:
    server: str
    cert: Path
    key: Path
    server_ca: Path
    store: Path

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        import tomllib
        data = tomllib.loads(path.read_text())
        base = path.parent
        return cls(server=data["server"].rstrip("/"), cert=base / data["cert"], key=base / data["key"],
                   server_ca=base / data["server_ca"], store=base / data["store"])


class RegistrationClient:
    def __init__(self, config: AgentConfig, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never let REQUESTS_CA_BUNDLE or a proxy variable redirect trust
        self.session.cert = (str(config.cert), str(config.key))
        self.session.verify = str(config.server_ca)
        der = x509.load_pem_x509_certificate(config.cert.read_bytes()).public_bytes(Encoding.DER)
        self.thumbprint = thumbprint(der)
        self._next_nonce: str | None = None  # from the last answer's Replay-Nonce

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistrationClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.config.server}/api/v1/{path}"

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.session.request(method, self.url(path), timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise AgentError(f"cannot reach {self.config.server}: {exc}") from exc
        self._next_nonce = response.headers.get("Replay-Nonce") or None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "detail" in body:
                raise AgentError(f"{body.get('title', 'refused')}: {body['detail']} "
                                 f"(HTTP {response.status_code}, {body.get('code')})",
                                 response.status_code, body.get("code"), body)
            raise AgentError(f"HTTP {response.status_code} from {path}", response.status_code)
        if not isinstance(body, dict):
            raise AgentError(f"unexpected answer from {path}")
        return body

    def nonce(self) -> str:
        nonce, self._next_nonce = self._next_nonce, None
        return nonce or self._call("GET", "nonce")["nonce"]

    def signed(self, path: str, payload: dict, *, key, chain: list[x509.Certificate]) -> dict:
        url = self.url(path)
        for attempt in (1, 2):
            body = sign_user_request(payload, key=key, chain=chain, nonce=self.nonce(), url=url,
                                     agent_thumbprint=self.thumbprint)
            try:
                return self._call("POST", path, data=body, headers={"Content-Type": "application/jose+json"})
            except AgentError as exc:
                # A kept nonce may have expired or been spent by another thread: one retry, fresh.
                if exc.code != "bad_nonce" or attempt == 2:
                    raise
                self._next_nonce = None
        raise AssertionError("unreachable")

    def bootstrap(self, payload: dict, *, code_id: str, mac_key: bytes) -> dict:
        url = self.url("bootstrap")
        body = mac_bootstrap_request(payload, code_id=code_id, secret=mac_key, nonce=self.nonce(), url=url,
                                     agent_thumbprint=self.thumbprint)
        return self._call("POST", "bootstrap", data=body, headers={"Content-Type": "application/jose+json"})


def dumps(body: dict) -> str:
    return json.dumps({k: v for k, v in body.items() if k not in {"pkcs12"}}, indent=2)
