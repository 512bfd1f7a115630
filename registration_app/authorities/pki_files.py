"""Key and certificate files in the data directory, and the initial PKI that `autoenroll init` creates.

Every file is written by core/files.py to a temporary name and then hard-linked to its final name: the
link fails if the name exists (never overwrite) and the final name only ever holds complete content. Private keys and
secrets are created with mode 0600, certificates and public keys 0644.

`create_pki` makes two separate roots:

- the **S/MIME CA** (`ca.key`, `ca.pem`) that signs users' certificates and the CRL — the trust anchor mail
  clients and the user-JWS verifier use;
- a **TLS CA** (`tls-ca.key`, `tls-ca.pem`) that signs the registration server's certificate and the user
  servers' (agents') client certificates — the anchor gunicorn's `ca_certs` and the agents trust.

Keeping them apart means a user's S/MIME certificate can never be taken for an agent's TLS identity (or
the reverse), the S/MIME CA issues only S/MIME certificates (as the BR expect of an S/MIME issuer), and
either CA can be replaced without reissuing the other's certificates.

The KRA storage key (`kra.key`, RSA-3072) has no certificate: `kra.pem` is its SubjectPublicKeyInfo
("PUBLIC KEY" PEM), which is all a sealer needs.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from ..core.errors import AlreadyExists, ConfigError
from ..core.files import write_file
from ..core.model import KeyType
from ..store.keys import CHECKPOINT_FILE, KEY_BYTES, KEY_FILES, StoreKeys
from .certs import build_ca_certificate, build_tls_certificate
from .keys import generate_private_key

_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644


# --- single files ---------------------------------------------------------------------------------


def write_private_key(path: Path, key, passphrase: bytes) -> None:
    """Write `key` as encrypted PKCS#8 PEM (best available encryption), mode 0600, never overwriting."""
    if not passphrase:
        raise ConfigError("a non-empty passphrase is required to write a private key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(bytes(passphrase)),
    )
    _write_new(Path(path), pem, _KEY_MODE)


def write_unencrypted_private_key(path: Path, key) -> None:
    """Write `key` as plain PKCS#8 PEM, mode 0600: only for TLS keys a server must read unattended."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(Path(path), pem, _KEY_MODE)


def read_private_key(path: Path, passphrase: bytes | None):
    """Load a PEM private key; `passphrase` None for an unencrypted one."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise ConfigError(f"{path.name}: {exc}") from None
    except ValueError:
        raise ConfigError(f"{path.name}: cannot load the key (wrong passphrase or not a PEM key)") from None


def write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_new(Path(path), cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)


def write_public_key(path: Path, public_key) -> None:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(Path(path), pem, _PUBLIC_MODE)


def read_public_key(path: Path):
    path = Path(path)
    try:
        return serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{path.name}: not a PEM public key") from None


def read_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (or a DER file)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path.name}: not a certificate") from None


def read_certs(path: Path) -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in file order."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{path.name}: not a PEM certificate bundle") from None


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret (passphrase, MAC key) with mode 0600, never overwriting."""
    _write_new(Path(path), bytes(data), _KEY_MODE)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    write_file(path, data, mode=mode)  # core/files.py: the one safe writer, never overwriting here


# --- the initial PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PkiPaths:
    """Where `create_pki` put each file (relative names are fixed; the directory is the caller's)."""

    ca_key: Path
    ca_cert: Path
    kra_key: Path
    kra_public_key: Path
    tls_ca_key: Path
    tls_ca_cert: Path
    server_key: Path
    server_cert: Path
    agent_key: Path
    agent_cert: Path

    @classmethod
    def in_dir(cls, datadir: Path) -> PkiPaths:
        d = Path(datadir)
        return cls(
            ca_key=d / "ca.key", ca_cert=d / "ca.pem",
            kra_key=d / "kra.key", kra_public_key=d / "kra.pem",
            tls_ca_key=d / "tls-ca.key", tls_ca_cert=d / "tls-ca.pem",
            server_key=d / "server.key", server_cert=d / "server.pem",
            agent_key=d / "agent.key", agent_cert=d / "agent.pem",
        )

    def all(self) -> list[Path]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class PemKeyStore:
    """The KeyStore of core/ports.py as the encrypted PEM files of the data folder (ca.key, kra.key), read
    with the passphrase when a key is asked for, so a role that never asks never reads the passphrase."""

    paths: PkiPaths
    passphrase: Callable[[], bytes]

    def ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        # ca.key is the EC or RSA key create_pki wrote; load_pem_private_key types any private key
        return cast(CertificateIssuerPrivateKeyTypes, read_private_key(self.paths.ca_key, self.passphrase()))

    def tls_ca_signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        return cast(CertificateIssuerPrivateKeyTypes, read_private_key(self.paths.tls_ca_key, self.passphrase()))

    def kra_storage_key(self) -> rsa.RSAPrivateKey:
        # kra.key is the RSA-3072 key create_pki wrote; escrow_crypto refuses any other storage key
        return cast(rsa.RSAPrivateKey, read_private_key(self.paths.kra_key, self.passphrase()))


def create_pki(
    datadir: Path,
    *,
    ca_key_type: KeyType = KeyType.EC_P256,
    ca_name: str = "Autoenroll CA",
    org: str | None = None,
    server_names: Iterable[str] = ("localhost", "127.0.0.1"),
    agent_names: Iterable[str] = ("agent.example.org",),
    passphrase: bytes,
    now: datetime,
    token: Token | None = None,
    in_token: frozenset[str] = frozenset(),
) -> PkiPaths:
    """Create the S/MIME CA, the KRA storage key, the TLS CA, a server and an agent certificate.

    If every file exists, nothing is touched and the paths are returned. If only some exist, AlreadyExists
    names them: keys are never overwritten, and a half-made PKI is for a person to look at.
    The CA, TLS CA and KRA keys are encrypted with `passphrase`; server.key and agent.key are not
    (gunicorn and the agent read them unattended) but are mode 0600.
    The keys named in `in_token` ("ca", "tls_ca", "kra") are generated in `token` instead and have no file.
    """
    paths = PkiPaths.in_dir(datadir)
    in_files = {"ca": "ca" not in in_token, "tls_ca": "tls_ca" not in in_token, "kra": "kra" not in in_token}
    expected = [p for p in paths.all() if not (
        (p == paths.ca_key and not in_files["ca"]) or (p == paths.tls_ca_key and not in_files["tls_ca"])
        or (p == paths.kra_key and not in_files["kra"]))]
    present = [p for p in expected if p.exists()]
    if len(present) == len(expected):
        return paths
    if present:
        missing = [p.name for p in expected if not p.exists()]
        raise AlreadyExists(
            f"{Path(datadir).name}: {', '.join(p.name for p in present)} already exist but "
            f"{', '.join(missing)} do not; refusing to overwrite or mix key material",
            present=[str(p) for p in present],
        )
    if not passphrase:
        raise ConfigError("a non-empty passphrase is required for the CA and KRA keys")
    server_names, agent_names = list(server_names), list(agent_names)
    if not server_names or not agent_names:
        raise ConfigError("the server and the agent each need at least one name")

    if in_token and token is None:
        raise ConfigError("keys in a token need the token (key_store.module, key_store.token)")
    if token is not None and in_token:  # refuse before making anything, not after the first key
        from .pkcs11_store import key_label
        taken = sorted({key_label(name) for name in in_token} & token.labels())
        if taken:
            raise AlreadyExists(f"token {token.label!r} already holds {', '.join(taken)}; refusing to make a "
                                "second CA or KRA key (a half-made PKI is for a person to look at)", present=taken)

    def new_key(name: str, key_type: KeyType):
        return token.generate(name, key_type) if token is not None and name in in_token \
            else generate_private_key(key_type)

    # Generate everything before writing any file: a failure here leaves no file behind.
    ca_key = new_key("ca", ca_key_type)
    ca_cert = build_ca_certificate(ca_key, _name(ca_name, org), now)
    kra_key = new_key("kra", KeyType.RSA_3072)
    tls_ca_key = new_key("tls_ca", KeyType.EC_P256)
    tls_ca_cert = build_ca_certificate(tls_ca_key, _name(f"{ca_name} TLS", org), now)
    server_key = generate_private_key(KeyType.EC_P256)
    server_cert = _tls_cert(tls_ca_cert, tls_ca_key, server_key, server_names, now, server=True)
    agent_key = generate_private_key(KeyType.EC_P256)
    agent_cert = _tls_cert(tls_ca_cert, tls_ca_key, agent_key, agent_names, now, server=False)

    Path(datadir).mkdir(mode=0o700, parents=True, exist_ok=True)
    # Keys first, each followed by its certificate, so that an interrupted run is visible as such.
    if in_files["ca"]:
        write_private_key(paths.ca_key, ca_key, passphrase)
    write_cert(paths.ca_cert, ca_cert)
    if in_files["kra"]:
        write_private_key(paths.kra_key, kra_key, passphrase)
    write_public_key(paths.kra_public_key, kra_key.public_key())
    if in_files["tls_ca"]:
        write_private_key(paths.tls_ca_key, tls_ca_key, passphrase)
    write_cert(paths.tls_ca_cert, tls_ca_cert)
    write_unencrypted_private_key(paths.server_key, server_key)
    write_cert(paths.server_cert, server_cert)
    write_unencrypted_private_key(paths.agent_key, agent_key)
    write_cert(paths.agent_cert, agent_cert)
    return paths


def _name(common_name: str, org: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))  # most significant first
    return x509.Name(attributes)


def _tls_cert(ca_cert, ca_key, key, names: list[str], now: datetime, *, server: bool) -> x509.Certificate:
    dns, ips = [], []
    for name in names:
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            dns.append(name)
    return build_tls_certificate(
        ca_cert, ca_key, key.public_key(), dns_names=dns, ip_addresses=ips, common_name=names[0],
        client=not server, server=server, now=now,
    )


# --- the server's secrets and the data folder's modes ---------------------------------------------


def create_server_keys(datadir: Path, names: Iterable[str] = tuple(KEY_FILES)) -> list[str]:
    """Create the missing secret files (random 256-bit keys, mode 0600); the names of those created."""
    created = []
    for name in names:
        path = Path(datadir) / KEY_FILES[name]
        if not path.exists():
            write_secret(path, secrets.token_hex(KEY_BYTES).encode() + b"\n")
            created.append(name)
    return created


def read_server_keys(datadir: Path, names: Iterable[str]) -> StoreKeys:
    """The keys a role uses, read at start (wiring.py); a missing, malformed or exposed file is a
    ConfigError naming it. The audit checkpoint sits beside them."""
    keys = {}
    for name in names:
        path = Path(datadir) / KEY_FILES[name]
        check_private(path)
        try:
            keys[name] = bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            raise ConfigError(f"no {path.name} in {datadir}: run `autoenroll init`, or copy it from the host "
                              "where init ran (README, Server secrets)") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or 'not a hex key'}") from None
        if len(keys[name]) != KEY_BYTES:
            raise ConfigError(f"{path} must hold a {KEY_BYTES * 8}-bit key in hex")
    return StoreKeys(**keys, checkpoint=Path(datadir) / CHECKPOINT_FILE if "audit" in keys else None)


def check_private(path: Path) -> None:
    """Refuse a private file or folder that others than its owner may read (as ssh does); a missing
    one is not this check's business."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return
    if mode & 0o077:
        wanted = "700" if Path(path).is_dir() else "600"
        raise ConfigError(f"{path} is open to other users (mode {mode:o}): it holds private data; "
                          f"chmod {wanted} {path} (or run `autoenroll init`, which does)")


def make_private(path: Path) -> bool:
    """Take away every permission of group and others (init); True if a bit was removed."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return False
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
        return True
    return False


if TYPE_CHECKING:
    from .pkcs11_store import Token

if TYPE_CHECKING:  # mypy (make test) checks that PemKeyStore has the signatures of the Protocol
    from ..core.ports import KeyStore

    def _is_key_store(implementation: PemKeyStore) -> KeyStore:
        return implementation
