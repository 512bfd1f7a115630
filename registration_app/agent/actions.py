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


def _signed_folder(store: AgentStore, email: str):
    folder = store.user(email)
    if not folder.has_signature():
        raise AgentError(f"no signature certificate for {email} in {store.root}; run `autoenroll-agent "
                         "bootstrap` with an enrollment code first")
    return folder


def enroll(client: RegistrationClient, store: AgentStore, email: str, profile: str | None, *,
           password: str | None = None, legacy: bool = False, replace: bool = False,
           client_key: bool = False, renews: str | None = None) -> Outcome:
    """Obtain a certificate for `profile` (None: the server's default_encryption_profile),
    authenticated by the user's signature certificate."""
    if profile is None and client_key:
        raise ValueError("a key generated here (--client-key) is for a signature profile: name it with --profile")
    folder = _signed_folder(store, email)
    payload: dict = {"replace": replace} if profile is None else {"profile": profile, "replace": replace}
    if renews is not None:
        payload["renews"] = renews
    new_key = None
    if client_key:
        new_key = _pending_key(folder, profile, renews)
        payload["csr"] = make_csr(new_key, email)
    else:
        password = password or secrets.token_urlsafe(18)
        payload["password"] = password
        payload["pkcs12_legacy"] = legacy
    body = client.signed("enroll", payload, key=folder.signature_key(), chain=folder.signature_chain())
    if new_key is not None and body["usage"] == "signature":
        folder.save_signature(new_key, [body["certificate"], *body["chain"]])
        _pending_path(folder, profile).unlink(missing_ok=True)
        files = {"key": folder.signature_key_path, "certificate": folder.signature_cert_path}
    else:
        pkcs12 = base64.b64decode(body["pkcs12"]) if "pkcs12" in body else None
        files = folder.save_delivery(body["profile"], body["serial"], body["certificate"], body["chain"],
                                     pkcs12, password if pkcs12 is not None else None)
        if body["usage"] == "signature" and pkcs12 is not None:
            _adopt_signature(folder, pkcs12, password)
    _remember(folder, body)
    return Outcome(email, body["profile"], body["serial"], body["not_after"], body["published"], files)


def _pending_path(folder, profile: str) -> Path:
    return folder.path / f"pending-{profile}.key"


def _pending_key(folder, profile: str, renews: str | None):
    """The new key is on disk before the request leaves: if the answer is lost, the retry sends the
    same CSR and the server returns the certificate it already issued instead of a second one."""
    path = _pending_path(folder, profile)
    if renews is not None and path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    from .store import write_private
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def renew(client: RegistrationClient, store: AgentStore, email: str, profile: str, *,
          force: bool = False) -> Outcome:
    """Renew the current certificate of `profile` (the server refuses a second renewal of it)."""
    folder = _signed_folder(store, email)
    state = folder.state()
    serial = state.get("current", {}).get(profile)
    if serial is None:
        raise AgentError(f"{email} has no current {profile} certificate in this agent's store")
    usage = state["certificates"][serial]["usage"]
    return enroll(client, store, email, profile, renews=serial, replace=force,
                  client_key=usage == "signature")


def list_remote(client: RegistrationClient, store: AgentStore, email: str) -> dict:
    folder = _signed_folder(store, email)
    return client.signed("certificates", {}, key=folder.signature_key(), chain=folder.signature_chain())


def recover(client: RegistrationClient, store: AgentStore, email: str, *, serials: list[str] | None,
            password: str | None = None, legacy: bool = False) -> list[Outcome]:
    """Get escrowed encryption keys back (None = all of them) as PKCS#12 files in the store."""
    folder = _signed_folder(store, email)
    password = password or secrets.token_urlsafe(18)
    payload = {"password": password, "pkcs12_legacy": legacy, **({"all": True} if serials is None
                                                                  else {"serials": serials})}
    body = client.signed("recover", payload, key=folder.signature_key(), chain=folder.signature_chain())
    return [_save_recovered(folder, item, password) for item in body["keys"]]


def _save_recovered(folder, item: dict, password: str) -> Outcome:
    from cryptography.hazmat.primitives.serialization import pkcs12 as p12
    raw = base64.b64decode(item["pkcs12"])
    _, cert, chain = p12.load_key_and_certificates(raw, password.encode())
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in [cert, *chain]]
    files = folder.save_delivery(f"recovered-{item['profile']}", item["serial"], pems[0], pems[1:], raw, password)
    return Outcome(folder.email, item["profile"], item["serial"], item["not_after"], True, files)


def revoke(client: RegistrationClient, store: AgentStore, email: str, serial: str, reason: str) -> dict:
    folder = _signed_folder(store, email)
    return client.signed("revoke", {"serial": serial, "reason": reason}, key=folder.signature_key(),
                         chain=folder.signature_chain())


def officer_call(client: RegistrationClient, store: AgentStore, officer: str, path: str, payload: dict) -> dict:
    """A recovery officer's signed request (the officer's own signature certificate)."""
    folder = _signed_folder(store, officer)
    return client.signed(path, payload, key=folder.signature_key(), chain=folder.signature_chain())


def officer_release(client: RegistrationClient, store: AgentStore, officer: str, request_id: str, *,
                    password: str | None = None) -> tuple[dict, list[Outcome]]:
    folder = _signed_folder(store, officer)
    password = password or secrets.token_urlsafe(18)
    body = client.signed(f"recovery-requests/{request_id}/release", {"password": password},
                         key=folder.signature_key(), chain=folder.signature_chain())
    return body, [_save_recovered(folder, item, password) for item in body["keys"]]


def _adopt_signature(folder, pkcs12: bytes, password: str) -> None:
    """A server-generated replacement signature key becomes the user's signing key here."""
    from cryptography.hazmat.primitives.serialization import pkcs12 as p12
    key, cert, chain = p12.load_key_and_certificates(pkcs12, password.encode())
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in [cert, *chain]]
    folder.save_signature(key, pems)


def _remember(folder, body: dict) -> None:
    state = folder.state()
    state.setdefault("certificates", {})[body["serial"]] = {
        "profile": body["profile"], "usage": body["usage"], "not_after": body["not_after"],
        "not_before": body.get("not_before", "")}
    state.setdefault("current", {})[body["profile"]] = body["serial"]
    folder.save_state(state)
