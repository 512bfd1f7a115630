"""PKCS#12 files that deliver a server-generated private key with its certificate and chain."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12

from ..core.errors import BadRequest

# OpenSSL 3's default, and the count cryptography writes the MAC with whatever the bags' count: an offline
# guesser tests passwords against the MAC, so a higher count on the bags costs time and buys nothing.
DEFAULT_ITERATIONS = 2048


def to_pkcs12(
    *,
    key,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    password: str,
    friendly_name: str,
    legacy: bool = False,
    iterations: int = DEFAULT_ITERATIONS,
) -> bytes:
    """Serialise key, certificate and chain, protected by `password`.

    Default: PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) for the key and certificate bags, HMAC-SHA256 MAC.
    `legacy=True`: PBES1 pbeWithSHAAnd3-KeyTripleDES-CBC with a SHA-1 MAC, for clients such as gpgsm 2.2
    (Debian 12) that cannot read PBES2. Use it only for such clients: 3DES and SHA-1 are weak.
    The iteration count is spent twice, on the key bag and on the (public) certificate bag. The MAC,
    which an offline guesser can test passwords against too, is written by cryptography with 2048
    iterations whatever `iterations` says (`openssl pkcs12 -info` shows both), so counts above the
    default add cost without adding resistance to guessing; the agent's passwords are 144 random bits,
    and a user-chosen one (`--password-file`) should be long.
    """
    if not isinstance(password, str) or not password:
        raise BadRequest("a non-empty PKCS#12 password is required")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    if legacy:
        algorithm, mac = pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC, hashes.SHA1()
    else:
        algorithm, mac = pkcs12.PBES.PBESv2SHA256AndAES256CBC, hashes.SHA256()
    encryption = (
        PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(iterations)
        .key_cert_algorithm(algorithm)
        .hmac_hash(mac)
        .build(password.encode("utf-8"))
    )
    return pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"), key, cert, list(chain) or None, encryption
    )
