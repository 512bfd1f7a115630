"""HTTP clients of a CA and a KRA that run as separate services (role "ra" of a split deployment).

`RemoteCA` and `RemoteKRA` satisfy the Protocols of core/ports.py (CertificateAuthority, RecoveryAuthority)
as LocalCA and LocalKRA do, and `RemotePublisher` has the methods of Publisher that the RA calls, so the key
authority, the RA and recovery do not know which they talk to. The server side is registration_app/web/authority_api.py; bodies are JSON, errors RFC 9457
problem documents that come back here as the same AutoenrollError they were on the other side.

The RA authenticates with its own TLS client certificate (clientAuth, from the TLS CA; the authorities
accept only the names in their `authority_clients`) over one keep-alive session per authority.
`trust_env` is off so that no proxy or CA-bundle variable can redirect where keys and certificates go.

What crosses the wire is chosen so that the RA never holds what it does not need: escrow sends a blob
the RA sealed with the KRA's *public* key; recovery sends the signed requests of the grant and gets a
PKCS#12 wrapped by the KRA under the password the user signed, never a raw key.
"""

from __future__ import annotations

import base64
import logging
from datetime import datetime
from typing import TYPE_CHECKING, cast

import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from requests.adapters import HTTPAdapter

from ..core.errors import (AutoenrollError, BadRequest, ConfigError, Conflict, EscrowFailed, Forbidden,
                           NotFound, RateLimited, Unauthenticated, Unavailable)
from ..core.model import Profile, RecoveryGrant, Subject
from .escrow_crypto import escrow_aad, seal_private_key

log = logging.getLogger("autoenroll.remote")

API = "/authority/v1"
# The authority refused *this RA* (certificate, allow-list): a deployment fault, not the user's.
_CLIENT_AUTH_CODES = {"no_client_certificate", "bad_client_certificate", "agent_not_allowed"}
_BY_STATUS: dict[int, type[AutoenrollError]] = {400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: Conflict,
              429: RateLimited}


def _error_classes() -> dict[str, type[AutoenrollError]]:
    found: dict[str, type[AutoenrollError]] = {}
    todo = [AutoenrollError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_from_problem(status: int, body: object, authority: str) -> AutoenrollError:
    """The AutoenrollError an authority raised, rebuilt from its problem document."""
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):  # maybe not the authority (a proxy)
        return NoAnswer(f"the {authority} answered HTTP {status} without a problem document")
    code, detail = body["code"], str(body.get("detail") or "")[:2000]
    if code in _CLIENT_AUTH_CODES:
        return Unavailable(f"the {authority} refused this RA's client certificate ({code}): {detail}")
    if status >= 500:
        log.error("event=authority.error authority=%s status=%d code=%s detail=%r request_id=%s",
                  authority, status, code, detail, body.get("request_id"))
        # a failure this side knows as one of its own (the CA's token: key_store_unavailable) keeps its code
        known = _error_classes().get(code)
        if known is not None and issubclass(known, Unavailable) and known is not NoAnswer:
            failure = known(f"the {authority} failed: {detail}")
            failure.code = code
            return failure
        return Unavailable(f"the {authority} failed ({code}); try again later")
    # A code this side knows is its class; another by the family its HTTP status names.
    cls = _error_classes().get(code) or _BY_STATUS.get(status) or BadRequest
    error = cls(detail) if cls is not RateLimited else cls(detail, retry_after=60)
    error.code = code  # the other side's exact code, even for a class this side does not know
    return error


class NoAnswer(Unavailable):
    """The authority sent no answer (unreachable, timed out, the connection dropped, or a reply that is no
    problem document): what it did with the request is unknown; it may still be doing it. The key authority
    leaves a pending escrow to the KRA's sweep then, rather than withdrawing it (authorities/kra.py)."""

    in_doubt = True


class AuthorityClient:
    """JSON over one keep-alive mTLS session to one authority."""

    def __init__(self, base_url: str, *, name: str, client_cert: tuple[str, str], server_ca: str,
                 timeout: float = 10.0, pool_size: int = 8) -> None:
        if not base_url.startswith("https://"):
            raise ConfigError(f"the {name} URL must be https:// (mTLS), not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.cert = client_cert
        self.session.verify = server_ca
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size)  # one connection per worker thread
        self.session.mount("https://", adapter)

    def call(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None,
             request_id: str | None = None) -> dict:
        headers = {"X-Request-ID": request_id} if request_id else {}
        try:
            response = self.session.request(method, f"{self.base_url}{API}{path}", json=body, headers=headers,
                                            timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise NoAnswer(f"the {self.name} at {self.base_url} cannot be reached ({type(exc).__name__})") from exc
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            raise error_from_problem(response.status_code, answer, self.name)
        if not isinstance(answer, dict):
            raise Unavailable(f"the {self.name} sent an answer that is not a JSON object")
        return answer

    def close(self) -> None:
        self.session.close()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def _field(answer: dict, name: str, kind: type, authority: str):
    value = answer.get(name)
    if not isinstance(value, kind):
        raise Unavailable(f"the {authority} answer lacks {name!r}")
    return value


# --- the CA --------------------------------------------------------------------------------------


class RemoteCA:
    """The CA of DESIGN.md behind HTTP. The CA service uses its own clock and its own profiles: the RA
    names a profile, it cannot define one."""

    def __init__(self, client: AuthorityClient, certificate: x509.Certificate) -> None:
        self.client = client
        self.certificate = certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.certificate]

    def sign(self, public_key, profile: Profile, subject: Subject, *, user_dn: str, serial: int,
             replaces: str | None, key_source: str, actor: str, now: datetime | None = None,
             entry_id: str | None = None) -> x509.Certificate:
        answer = self.client.call("POST", "/ca/sign", {
            "public_key": public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode(),
            "profile": profile.name, "subject": {"email": subject.email, "common_name": subject.common_name},
            "user_dn": user_dn, "entry_id": entry_id or None, "serial": format(serial, "x"), "replaces": replaces,
            "key_source": key_source, "actor": actor})
        cert = x509.load_pem_x509_certificate(_field(answer, "certificate", str, "CA").encode())
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if cert.serial_number != serial or cert.issuer != self.certificate.subject or \
                cert.public_key().public_bytes(*spki) != public_key.public_bytes(*spki):
            raise Unavailable("the CA returned a certificate that is not the one requested")
        return cert

    def revoke(self, serial: int | str, reason: x509.ReasonFlags, *, actor: str = "operator",
               now: datetime | None = None) -> bool:
        serial_text = (serial if isinstance(serial, str) else format(serial, "x")).lower()
        answer = self.client.call("POST", "/ca/revoke", {"serial": serial_text, "reason": reason.value,
                                                          "actor": actor})
        return bool(answer.get("changed"))

    def revoke_many(self, serials: list[str], reason: x509.ReasonFlags, *, actor: str = "operator",
                    now: datetime | None = None, must_exist: bool = False,
                    details: dict[str, dict] | None = None) -> list[str]:
        answer = self.client.call("POST", "/ca/revoke-many", {
            "serials": list(serials), "reason": reason.value, "actor": actor, "must_exist": must_exist,
            "details": details or {}})
        return list(_field(answer, "changed", list, "CA"))

    def crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        return self._crl(self.client.call("GET", "/ca/crl"))

    def crl_now(self) -> x509.CertificateRevocationList | None:
        return self.crl()

    def refresh_crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        return self._crl(self.client.call("POST", "/ca/crl/refresh", {"if_due": False}))

    def refresh_crl_if_due(self, now: datetime | None = None) -> x509.CertificateRevocationList | None:
        answer = self.client.call("POST", "/ca/crl/refresh", {"if_due": True})
        return self._crl(answer) if answer.get("crl") else None

    def _crl(self, answer: dict) -> x509.CertificateRevocationList:
        crl = x509.load_der_x509_crl(base64.b64decode(_field(answer, "crl", str, "CA")))
        # a CA certificate's key is one that signs (CertificateIssuerPublicKeyTypes); x509 types any key
        issuer_key = cast(CertificateIssuerPublicKeyTypes, self.certificate.public_key())
        if crl.issuer != self.certificate.subject or not crl.is_signature_valid(issuer_key):
            raise Unavailable("the CA returned a CRL that its certificate does not verify")
        return crl

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Asked on every user request (no cache), so a revocation refuses the next request."""
        if cert.issuer != self.certificate.subject:
            return False
        answer = self.client.call("GET", f"/ca/certificates/{cert.serial_number:x}/status")
        return answer.get("status") == "revoked"

    def close(self) -> None:
        self.client.close()


class RemotePublisher:
    """The CA publishes (its outbox worker); the RA asks it to publish one user now, inline."""

    def __init__(self, client: AuthorityClient, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    def drain(self, *, user_dn: str | None = None, limit: int = 200, now: datetime | None = None) -> int:
        answer = self.client.call("POST", "/ca/publish", {"user_dn": user_dn, "limit": limit},
                                  timeout=self.timeout)
        return int(answer.get("done") or 0)

    def publish_user_now(self, user_dn: str) -> bool:
        answer = self.client.call("POST", "/ca/publish/user", {"user_dn": user_dn}, timeout=self.timeout)
        return bool(answer.get("published"))

    def pending(self, user_dn: str) -> bool:
        return bool(self.client.call("POST", "/ca/publish/pending", {"user_dn": user_dn}).get("pending"))


# --- the KRA -------------------------------------------------------------------------------------


def grant_to_json(grant: RecoveryGrant) -> dict:
    return {"kind": grant.kind, "email": grant.email, "actor": grant.actor, "request_id": grant.request_id,
            "evidence": [base64.b64encode(e).decode("ascii") for e in grant.evidence]}


def grant_from_json(body: object, *, max_evidence: int = 32) -> RecoveryGrant:
    if not isinstance(body, dict):
        raise BadRequest("field 'grant' must be an object")
    kind, email, actor = body.get("kind"), body.get("email"), body.get("actor")
    request_id, evidence = body.get("request_id"), body.get("evidence")
    if not (isinstance(kind, str) and isinstance(email, str) and isinstance(actor, str)) or \
            not all(0 < len(v) <= 1024 for v in (kind, email, actor)):
        raise BadRequest("a grant names its kind, email and actor")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 32):
        raise BadRequest("a grant's request_id is a short string")
    if not isinstance(evidence, list) or len(evidence) > max_evidence or \
            not all(isinstance(e, str) for e in evidence):
        raise BadRequest(f"a grant's evidence is a list of at most {max_evidence} base64 strings")
    try:
        raw = tuple(base64.b64decode(e, validate=True) for e in evidence)
    except ValueError as exc:
        raise BadRequest("a grant's evidence is base64") from exc
    return RecoveryGrant(kind=kind, email=email, actor=actor, request_id=request_id, evidence=raw)


class RemoteKRA:
    """The KRA of DESIGN.md behind HTTP. The RA holds only the public storage key."""

    def __init__(self, client: AuthorityClient, storage_public_key) -> None:
        self.client = client
        self._public = storage_public_key

    def escrow(self, serial: str, key, *, email: str, profile: str, actor: str,
               now: datetime | None = None) -> int:
        """Seal here, send only the blob; any failure raises EscrowFailed (nothing is delivered)."""
        return self._escrow(serial, key, email=email, profile=profile, actor=actor, pending=False)

    def escrow_pending(self, serial: str, key, *, email: str, profile: str, actor: str,
                       now: datetime | None = None) -> int:
        """The first phase (authorities/kra.py): the KRA records the sealed key pending, not recoverable
        until `confirm`. Any failure raises EscrowFailed (nothing is signed, nothing delivered)."""
        return self._escrow(serial, key, email=email, profile=profile, actor=actor, pending=True)

    def _escrow(self, serial: str, key, *, email: str, profile: str, actor: str, pending: bool) -> int:
        try:
            blob = seal_private_key(key, self._public, escrow_aad(int(serial, 16), email, profile))
            answer = self.client.call("POST", "/kra/escrow", {
                "serial": serial, "sealed": base64.b64encode(blob).decode("ascii"), "email": email,
                "profile": profile, "actor": actor, "pending": pending})
            return int(answer["escrow_id"])
        except Exception as exc:  # the caller must not deliver anything, whatever went wrong
            raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc

    def confirm(self, serial: str, *, actor: str, now: datetime | None = None) -> str:
        """The CA has signed: the KRA confirms once its records show the certificate (Conflict until then)."""
        return str(_field(self.client.call("POST", "/kra/escrow/confirm", {"serial": serial, "actor": actor}),
                          "state", str, "KRA"))

    def withdraw(self, serial: str, *, actor: str, reason: str, now: datetime | None = None) -> str:
        """The CA answered with a failure: the KRA voids the escrow unless its records show the certificate."""
        return str(_field(self.client.call("POST", "/kra/escrow/withdraw", {
            "serial": serial, "actor": actor, "reason": reason[:300]}), "state", str, "KRA"))

    def recover(self, serial: str, grant: RecoveryGrant, *, now: datetime | None = None):
        raise Forbidden("a remote KRA never hands out a raw private key; use recover_pkcs12")

    def recover_pkcs12(self, serial: str, grant: RecoveryGrant, password: str, legacy: bool, friendly_name: str,
                       chain: list[x509.Certificate], *, now: datetime | None = None) -> bytes:
        """The KRA verifies the grant's evidence itself and wraps the key under the password (and legacy
        choice) of the signed request, so neither travels here; `password`, `legacy` and `chain` are the
        in-process signature's and equal by construction (ra/recovery.py reads them from the same request)."""
        answer = self.client.call("POST", "/kra/recover", {
            "serial": serial, "grant": grant_to_json(grant), "friendly_name": friendly_name})
        return base64.b64decode(_field(answer, "pkcs12", str, "KRA"))

    def close(self) -> None:
        self.client.close()


def load_public_key_pem(text: str):
    try:
        return load_pem_public_key(text.encode())
    except ValueError as exc:
        raise BadRequest("the public key is not a PEM SubjectPublicKeyInfo") from exc


if TYPE_CHECKING:  # mypy (make test) checks that the clients have the signatures of the Protocols
    from ..core.ports import CertificateAuthority, RecoveryAuthority

    def _is_certificate_authority(implementation: RemoteCA) -> CertificateAuthority:
        return implementation

    def _is_recovery_authority(implementation: RemoteKRA) -> RecoveryAuthority:
        return implementation
