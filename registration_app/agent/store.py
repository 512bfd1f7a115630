"""The agent's store: one folder per user, every secret file mode 0600.

    <store>/<email>/signature.key        the user's signature key (PEM, generated here)
    <store>/<email>/signature.pem        their current signature certificate + chain
    <store>/<email>/<profile>-<serial>.p12 / .pem / .pass   what enroll/recover delivered
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..core.files import write_file

_SAFE = re.compile(r"^[A-Za-z0-9._%+@-]{1,254}$")


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600, through the one safe writer (core/files.py):
    a fresh O_EXCL | O_NOFOLLOW temporary file, never a fixed name someone could plant a symlink at."""
    write_file(path, data, mode=0o600, replace=True)


@dataclass(frozen=True)
class UserFolder:
    path: Path
    email: str

    @property
    def signature_key_path(self) -> Path:
        return self.path / "signature.key"

    @property
    def signature_cert_path(self) -> Path:
        return self.path / "signature.pem"

    def has_signature(self) -> bool:
        return self.signature_key_path.exists() and self.signature_cert_path.exists()

    def signature_key(self):
        return serialization.load_pem_private_key(self.signature_key_path.read_bytes(), None)

    def signature_chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.signature_cert_path.read_bytes())

    def save_signature(self, key, chain_pem: list[str]) -> None:
        write_private(self.signature_key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        write_private(self.signature_cert_path, "".join(chain_pem).encode())

    def save_delivery(self, profile: str, serial: str, cert_pem: str, chain_pem: list[str],
                      pkcs12: bytes | None, password: str | None) -> dict[str, Path]:
        base = self.path / f"{profile}-{serial}"
        files = {"certificate": base.with_suffix(".pem")}
        write_private(files["certificate"], (cert_pem + "".join(chain_pem)).encode())
        if pkcs12 is not None:
            files["pkcs12"] = base.with_suffix(".p12")
            write_private(files["pkcs12"], pkcs12)
        if password is not None:
            files["password"] = base.with_suffix(".pass")
            write_private(files["password"], password.encode())
        return files

    def state(self) -> dict:
        path = self.path / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_state(self, state: dict) -> None:
        write_private(self.path / "state.json", json.dumps(state, indent=2, sort_keys=True).encode())


class AgentStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def user(self, email: str, create: bool = False) -> UserFolder:
        if not _SAFE.match(email) or email.startswith("."):
            raise ValueError(f"not a usable email address for a folder name: {email!r}")
        path = self.root / email.lower()
        if create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
        return UserFolder(path, email.lower())

    def users(self) -> list[UserFolder]:
        if not self.root.exists():
            return []
        return [UserFolder(p, p.name) for p in sorted(self.root.iterdir()) if p.is_dir()]
