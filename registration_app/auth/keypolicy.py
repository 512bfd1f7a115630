"""One policy for every public key the server accepts: the user's x5c chain (leaf and intermediates, so
also every officer's certificate), CSRs, and the agents' TLS client certificates.

RSA of 2048 to 8192 bits with an odd public exponent of at least 3, or EC on P-256, P-384 or P-521.
Anything else (RSA-1024, P-192, secp256k1, Ed25519, DSA) is refused with WeakKey (400) before any
expensive work: before a signature is verified with the key, a chain is built or the database is asked.
A profile or an algorithm may narrow this further (a CSR for an EC P-256 profile, ES256 needs P-256);
nothing widens it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from registration_app.core.errors import WeakKey

__all__ = ["check_public_key", "check_certificate_key", "MIN_RSA_BITS", "MAX_RSA_BITS", "ALLOWED_CURVES"]

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # larger keys only cost verification time
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_POLICY = "accepted keys: RSA of 2048 to 8192 bits, or EC on P-256, P-384 or P-521"


def check_public_key(key: object, what: str) -> None:
    """Raise WeakKey unless `key` meets the policy; `what` names it in the message ("the CSR key")."""
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise WeakKey(f"{what} is RSA-{key.key_size}; {_POLICY}", key=f"RSA-{key.key_size}")
        exponent = key.public_numbers().e  # cryptography refuses such keys at load today; stay explicit
        if exponent < 3 or exponent % 2 == 0:
            raise WeakKey(f"{what} has an invalid RSA public exponent; {_POLICY}")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise WeakKey(f"{what} is EC on {key.curve.name}; {_POLICY}", key=f"EC {key.curve.name}")
        return
    name = type(key).__name__.removeprefix("_").replace("PublicKey", "") or "unknown"
    raise WeakKey(f"{what} is of a key type that is not accepted ({name}); {_POLICY}", key=name)


def check_certificate_key(cert: x509.Certificate, what: str) -> None:
    """The policy applied to a certificate's subject key; a key cryptography cannot even load is refused too."""
    try:
        key = cert.public_key()
    except Exception:  # an unknown or malformed key algorithm in attacker-supplied DER
        raise WeakKey(f"{what} has a key of a type that is not accepted; {_POLICY}") from None
    check_public_key(key, what)
