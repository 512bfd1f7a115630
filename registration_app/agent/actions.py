"""What the agent does for one user; the CLI and the daemon both call these."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..core.codes import parse_code
from .client import AgentError, RegistrationClient
from .store import AgentStore


@dataclass
class Outcome:
    email: str
    profile: str
    serial: str
    not_after: str
    published: bool
    files: dict[str, Path] = field(default_factory=dict)


def make_csr(key, email: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, email)]))
           .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def bootstrap(client: RegistrationClient, store: AgentStore, email: str, code: str) -> Outcome:
    """First signature certificate: the key is generated here and never leaves this host."""
    code_id, mac_key = parse_code(code)
    folder = store.user(email, create=True)
    key = ec.generate_private_key(ec.SECP256R1())
    body = client.bootstrap({"csr": make_csr(key, email)}, code_id=code_id, mac_key=mac_key)
    folder.save_signature(key, [body["certificate"], *body["chain"]])
    _remember(folder, body)
    return Outcome(email, body["profile"], body["serial"], body["not_after"], body["published"],
                   {"key": folder.signature_key_path, "certificate": folder.signature_cert_path})


def enroll(client: RegistrationClient, store: AgentStore, email: str, profile: str, *,
           password: str | None = None, legacy: bool = False, replace: bool = False,
           client_key: bool = False) -> Outcome:
    """Obtain a certificate for `profile`, authenticated by the user's signature certificate."""
    folder = store.user(email)
    if not folder.has_signature():
        raise AgentError(f"no signature certificate for {email} in {store.root}; run `autoenroll-agent "
                         "bootstrap` with an enrollment code first")
    payload: dict = {"profile": profile, "replace": replace}
    new_key = None
    if client_key:
        new_key = ec.generate_private_key(ec.SECP256R1())
        payload["csr"] = make_csr(new_key, email)
    else:
        password = password or secrets.token_urlsafe(18)
        payload["password"] = password
        payload["pkcs12_legacy"] = legacy
    body = client.signed("enroll", payload, key=folder.signature_key(), chain=folder.signature_chain())
    if new_key is not None and body["usage"] == "signature":
        folder.save_signature(new_key, [body["certificate"], *body["chain"]])
        files = {"key": folder.signature_key_path, "certificate": folder.signature_cert_path}
    else:
        pkcs12 = base64.b64decode(body["pkcs12"]) if "pkcs12" in body else None
        files = folder.save_delivery(body["profile"], body["serial"], body["certificate"], body["chain"],
                                     pkcs12, password if pkcs12 is not None else None)
        if body["usage"] == "signature" and pkcs12 is not None:
            _adopt_signature(folder, pkcs12, password)
    _remember(folder, body)
    return Outcome(email, body["profile"], body["serial"], body["not_after"], body["published"], files)


def _adopt_signature(folder, pkcs12: bytes, password: str) -> None:
    """A server-generated replacement signature key becomes the user's signing key here."""
    from cryptography.hazmat.primitives.serialization import pkcs12 as p12
    key, cert, chain = p12.load_key_and_certificates(pkcs12, password.encode())
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in [cert, *chain]]
    folder.save_signature(key, pems)


def _remember(folder, body: dict) -> None:
    state = folder.state()
    state.setdefault("certificates", {})[body["serial"]] = {
        "profile": body["profile"], "usage": body["usage"], "not_after": body["not_after"]}
    state.setdefault("current", {})[body["profile"]] = body["serial"]
    folder.save_state(state)
