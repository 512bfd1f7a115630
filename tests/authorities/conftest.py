"""Shared material for the authorities tests: CAs of both key types, fixed time, an openssl runner."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from registration_app.authorities.certs import CaUrls, build_ca_certificate
from registration_app.authorities.keys import generate_private_key
from registration_app.core.model import KeyType

NOW = datetime.now(timezone.utc).replace(microsecond=0)
URLS = CaUrls(crl_url="http://pki.example.org/crl/ca.crl", ca_issuers_url="http://pki.example.org/ca.cer")


def openssl(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"openssl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout.decode()}\n{proc.stderr.decode()}"
        )
    return proc


def write_pem(path: Path, *objs) -> Path:
    data = b""
    for obj in objs:
        if isinstance(obj, x509.Certificate | x509.CertificateRevocationList):
            data += obj.public_bytes(serialization.Encoding.PEM)
        else:
            data += obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
    path.write_bytes(data)
    return path


class Ca:
    def __init__(self, key_type: KeyType) -> None:
        self.key = generate_private_key(key_type)
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Test CA {key_type.value}"),
        ])
        self.cert = build_ca_certificate(self.key, name, NOW)


@pytest.fixture(scope="session")
def ec_ca() -> Ca:
    return Ca(KeyType.EC_P256)


@pytest.fixture(scope="session")
def rsa_ca() -> Ca:
    return Ca(KeyType.RSA_3072)


@pytest.fixture(scope="session", params=["ec-ca", "rsa-ca"])
def ca(request, ec_ca, rsa_ca) -> Ca:
    return ec_ca if request.param == "ec-ca" else rsa_ca


@pytest.fixture(scope="session")
def user_keys() -> dict:
    """One key per type, generated once (RSA-3072 takes ≈ 150 ms)."""
    return {t: generate_private_key(t) for t in KeyType}
