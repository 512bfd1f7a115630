"""The user's signed request: a flattened JWS JSON object (RFC 7515 §7.2.2).

    {"protected": b64url(header JSON), "payload": b64url(payload JSON), "signature": b64url(sig)}

The checks run in an order chosen for security and for clear errors, cheapest and least trusting first:

1. the body is JSON (MalformedJSON), of the flattened shape with strict base64url (MalformedJWS);
2. `alg` is allowed here (UnsupportedAlgorithm), the required header fields are there and no member
   names or points to a key other than `x5c` (`jwk`, `jku`, `x5u`, `x5t`, `kid`: MalformedJWS);
3. the x5c leaf's key meets the key policy (WeakKey) and fits `alg` (UnsupportedAlgorithm);
4. the signature verifies with that key, via joserfc with an explicit one-algorithm allow-list
   (BadSignature): a forged request stops here, before any chain building, database or HTTP work;
5. the user's chain (`x5c`) verifies and is not revoked (chain.py), and the certificate has not been
   superseded by a renewal (CertificateSuperseded, after the caller's grace period);
6. the payload is a JSON object (MalformedJSON);
7. the signed `url` is this request's URL (UrlMismatch), `x5t#S256` is this TLS peer (BindingMismatch);
8. last, the nonce is consumed (BadNonce): a forged or misdirected request cannot burn nonces.

Every input, however malformed, ends in an AutoenrollError with a 4xx status: nothing here may 500.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws as joserfc_jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey, OctKey, RSAKey
from joserfc.registry import HeaderParameter, check_registry_header

from registration_app.core.errors import (
    AutoenrollError,
    BadEnrollmentCode,
    BadNonce,
    BadSignature,
    BindingMismatch,
    CertificateSuperseded,
    ConfigError,
    MalformedJSON,
    MalformedJWS,
    UnsupportedAlgorithm,
    UrlMismatch,
)
from registration_app.core.model import AgentIdentity, VerifiedRequest

from .chain import MAX_CHAIN_LENGTH, UserTrust, parse_leaf, verify_user_chain
from .keypolicy import check_public_key

__all__ = [
    "USER_ALGORITHMS",
    "BOOTSTRAP_ALGORITHM",
    "verify_user_request",
    "verify_bootstrap_request",
]

USER_ALGORITHMS = ("ES256", "PS256", "RS256")
BOOTSTRAP_ALGORITHM = "HS256"  # the one place HMAC is allowed, like ACME external account binding

MAX_JSON_DEPTH = 32
MAX_PROTECTED_CHARS = 64 * 1024  # five RSA-4096 certificates fit with room to spare
MAX_SIGNATURE_CHARS = 2048  # RSA-8192 is 1366 characters
MAX_PAYLOAD_CHARS = 1024 * 1024  # the web layer caps the body; this is a second fence
MAX_FIELD_CHARS = 1024  # nonce, kid, x5t#S256: far longer than any genuine value
MIN_CODE_SECRET_BYTES = 16

_FLATTENED_MEMBERS = ("protected", "payload", "signature")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# Header parameters that change how a JWS is processed and that no request here may use.
_REFUSED_HEADER = {
    "crit": "no critical header extensions are supported",
    "b64": "unencoded payloads (RFC 7797) are not accepted",
}
# Members that name or point to a signing key. A request's key is named by exactly one member (`x5c`
# for a user, `kid` for a bootstrap's enrollment code); any other would be a second, unverified claim
# about the key, which a careless reader might act on. `x5t#S256` is not among them: it is the
# thumbprint of the agent's TLS certificate (the channel binding), not of a signing key.
_KEY_MEMBERS = ("jwk", "jku", "x5u", "x5c", "x5t", "kid")
_EXTRA_HEADERS = {
    "nonce": HeaderParameter("Anti-replay nonce", "str"),
    "url": HeaderParameter("Request URL", "str"),
}


def verify_user_request(
    body: bytes,
    *,
    url: str,
    agent: AgentIdentity,
    trust: UserTrust,
    consume_nonce: Callable[[str], bool],
    is_revoked: Callable[[x509.Certificate], bool],
    now: datetime,
    successor_of: Callable[[int], str | None] | None = None,
) -> VerifiedRequest:
    """Authenticate a user's request relayed by `agent`; see the module docstring for the order of checks.

    `successor_of(serial)`, asked about a leaf issued by one of our CAs, names the serial (hex) of the
    certificate that superseded it once the caller's grace period is over, or None while it may still
    authenticate.
    """
    request = _parse_flattened(body)
    alg = _require_alg(request.header, USER_ALGORITHMS)
    _check_header_parameters(request.header, key_member="x5c")
    x5c = _require_x5c(request.header)
    binding = _require_binding(request.header)

    public_key = _leaf_public_key(x5c[0])
    check_public_key(public_key, "the user certificate's key")
    if not _key_fits(alg, public_key):
        raise UnsupportedAlgorithm(
            f"alg {alg} cannot be used with the certificate's {_describe(public_key)} key; "
            "use ES256 with EC P-256 keys, PS256 or RS256 with RSA keys"
        )
    jwk = ECKey.import_key(public_key) if alg == "ES256" else RSAKey.import_key(public_key)
    if not _signature_verifies(request, jwk, alg):
        raise BadSignature("the JWS signature does not verify with the key of the certificate in x5c")

    user = verify_user_chain(x5c, trust, now, is_revoked)
    successor = successor_of(user.serial) if successor_of is not None and user.issuer_is_ours else None
    if successor is not None:
        raise CertificateSuperseded(
            f"the user certificate (serial {user.serial:x}) has been superseded by serial {successor} "
            f"and no longer authenticates; sign with the key of certificate {successor}", successor=successor)

    payload = _payload_object(request)
    _check_binding(binding, url=url, agent=agent, consume_nonce=consume_nonce)
    return VerifiedRequest(payload=payload, user=user, agent=agent, protected=request.header)


def verify_bootstrap_request(
    body: bytes,
    *,
    url: str,
    agent: AgentIdentity,
    code_secret: Callable[[str], bytes | None],
    consume_nonce: Callable[[str], bool],
) -> tuple[dict, str]:
    """Authenticate a first enrollment MACed with an enrollment code. Returns (payload, code_id).

    The caller marks the code used; this function only proves that the sender knows its secret.
    """
    request = _parse_flattened(body)
    _require_alg(request.header, (BOOTSTRAP_ALGORITHM,))
    _check_header_parameters(request.header, key_member="kid")
    code_id = _require_str(request.header, "kid")
    binding = _require_binding(request.header)

    secret = code_secret(code_id)
    if secret is None:
        raise BadEnrollmentCode("the enrollment code is unknown, already used or expired")
    if len(secret) < MIN_CODE_SECRET_BYTES:
        raise ConfigError(f"enrollment code secrets must have at least {MIN_CODE_SECRET_BYTES} bytes")
    # joserfc's HMAC verification compares in constant time (hmac.compare_digest)
    if not _signature_verifies(request, OctKey.import_key(bytes(secret)), BOOTSTRAP_ALGORITHM):
        raise BadEnrollmentCode("the request is not MACed with this enrollment code's secret")

    payload = _payload_object(request)
    _check_binding(binding, url=url, agent=agent, consume_nonce=consume_nonce)
    return payload, code_id


# --- 1. shape -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Flattened:
    segments: dict[str, str]  # the three members exactly as received (the signing input uses them)
    header: dict[str, Any]
    payload: bytes
    signature: bytes


def _parse_flattened(body: bytes | bytearray | memoryview | str) -> _Flattened:
    if isinstance(body, str):
        text = body
    else:
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedJSON("the body is not UTF-8 text") from None
    document = load_json(text, "the body", MalformedJSON)
    if not isinstance(document, dict):
        raise MalformedJSON("the body must be a JSON object (a flattened JWS)")

    if "signatures" in document:
        raise MalformedJWS("the general JWS JSON serialization is not accepted; send the flattened form")
    unexpected = sorted(set(document) - set(_FLATTENED_MEMBERS))
    if unexpected:
        # An unprotected "header" would carry parameters nobody signed: refuse rather than ignore.
        raise MalformedJWS(f"unexpected member(s) {_names(unexpected)}; only protected, payload, signature")
    segments: dict[str, str] = {}
    for member in _FLATTENED_MEMBERS:
        if member not in document:
            raise MalformedJWS(f"the member {member!r} is missing")
        if not isinstance(document[member], str):
            raise MalformedJWS(f"the member {member!r} must be a string")
        segments[member] = document[member]

    for member, limit in (("protected", MAX_PROTECTED_CHARS), ("signature", MAX_SIGNATURE_CHARS),
                          ("payload", MAX_PAYLOAD_CHARS)):
        if len(segments[member]) > limit:
            raise MalformedJWS(f"the member {member!r} is longer than {limit} characters")
    decoded = {member: _b64url_decode(segments[member], member) for member in _FLATTENED_MEMBERS}
    if not decoded["signature"]:
        raise MalformedJWS("the signature is empty")

    try:
        header_text = decoded["protected"].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJWS("the protected header is not UTF-8 JSON") from None
    header = load_json(header_text, "the protected header", MalformedJWS)
    if not isinstance(header, dict):
        raise MalformedJWS("the protected header must be a JSON object")
    return _Flattened(segments=segments, header=header, payload=decoded["payload"], signature=decoded["signature"])


def _b64url_decode(value: str, member: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2): one encoding per byte string, no malleability."""
    if not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        raise MalformedJWS(f"the member {member!r} is not unpadded base64url") from None
    raw = value.encode("ascii")
    decoded = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != raw:
        raise MalformedJWS(f"the member {member!r} is not canonical base64url (stray bits)")
    return decoded


# --- 2. header fields ---------------------------------------------------------------------


def _require_alg(header: dict[str, Any], allowed: tuple[str, ...]) -> str:
    if "alg" not in header:
        raise MalformedJWS("the protected header has no 'alg'")
    alg = header["alg"]
    if not isinstance(alg, str) or alg not in allowed:
        shown = repr(alg)[:40]
        raise UnsupportedAlgorithm(f"alg {shown} is not allowed here; use {' or '.join(allowed)}")
    return alg


def _check_header_parameters(header: dict[str, Any], *, key_member: str) -> None:
    for name, reason in _REFUSED_HEADER.items():
        if name in header:
            raise MalformedJWS(f"the header parameter {name!r} is refused: {reason}")
    for name in _KEY_MEMBERS:
        if name != key_member and name in header:
            raise MalformedJWS(f"the header parameter {name!r} is refused: the signing key is named by "
                               f"{key_member!r} only, and no other member may name or point to a key")
    # The registered parameters (jku, jwk, x5u, x5t, typ, ...) must at least have the registered types,
    # or joserfc would refuse the JWS later with a misleading "bad signature".
    try:
        check_registry_header({**joserfc_jws.JWSRegistry.default_header_registry, **_EXTRA_HEADERS}, header)
    except JoseError as error:
        raise MalformedJWS(f"the protected header is invalid: {error.description}") from None


def _require_str(header: dict[str, Any], name: str) -> str:
    value = header.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedJWS(f"the protected header needs {name!r} as a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise MalformedJWS(f"the header parameter {name!r} is too long")
    return value


def _require_x5c(header: dict[str, Any]) -> list[bytes]:
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        raise MalformedJWS("the protected header needs 'x5c', a non-empty list: the user's certificate chain")
    if len(x5c) > MAX_CHAIN_LENGTH:
        raise MalformedJWS(f"'x5c' has {len(x5c)} certificates; at most {MAX_CHAIN_LENGTH} are accepted")
    chain = []
    for index, item in enumerate(x5c):
        # RFC 7515 §4.1.6: standard base64 (with padding) of DER, not base64url
        try:
            if not isinstance(item, str):
                raise ValueError
            raw = item.encode("ascii")
            der = base64.b64decode(raw, validate=True)
            if not der or base64.b64encode(der) != raw:
                raise ValueError
        except (UnicodeEncodeError, ValueError, binascii.Error):
            raise MalformedJWS(f"x5c[{index}] is not standard base64 of a DER certificate") from None
        chain.append(der)
    return chain


@dataclass(frozen=True)
class _Binding:
    nonce: str
    url: str
    agent_thumbprint: str


def _require_binding(header: dict[str, Any]) -> _Binding:
    return _Binding(
        nonce=_require_str(header, "nonce"),
        url=_require_str(header, "url"),
        agent_thumbprint=_require_str(header, "x5t#S256"),
    )


# --- 3-4. key and signature ---------------------------------------------------------------


def _leaf_public_key(der: bytes) -> object:
    """The x5c leaf's public key, read before anything trusts the certificate (chain.py verifies it)."""
    try:
        cert = parse_leaf(der)
    except Exception:  # any parse failure of attacker-supplied DER is a client error
        raise MalformedJWS("x5c[0] is not a valid DER certificate") from None
    try:
        return cert.public_key()
    except Exception:  # an unknown key algorithm: still the client's problem
        raise UnsupportedAlgorithm("the user certificate's key type is not supported") from None


def _key_fits(alg: str, public_key: object) -> bool:
    if alg == "ES256":
        return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)
    return isinstance(public_key, rsa.RSAPublicKey)


def _describe(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    return type(public_key).__name__.removeprefix("_").replace("PublicKey", "")


@functools.lru_cache(maxsize=None)
def _algorithm(alg: str) -> joserfc_jws.JWSAlgModel:
    """joserfc's implementation of `alg`, from a registry that allows that one algorithm only."""
    return joserfc_jws.JWSRegistry(header_registry=_EXTRA_HEADERS, algorithms=[alg],
                                   strict_check_header=False).get_alg(alg)


def _signature_verifies(request: _Flattened, key: Any, alg: str) -> bool:
    """The signature over the members as received, verified by joserfc's algorithm `alg` (the only one
    its registry allows). The JWS was parsed here, strictly (steps 1-2: shape, base64url, header
    parameters and their types), so joserfc's own parse of the same members (`deserialize_json`:
    the JSON and base64 decoded again, a registry per request) is not repeated: it cost a third of the
    verification (PERFORMANCE.md, "Authentication")."""
    signing_input = f"{request.segments['protected']}.{request.segments['payload']}".encode("ascii")
    try:
        algorithm = _algorithm(alg)
        algorithm.check_key(key)
        return bool(algorithm.verify(signing_input, request.signature, key))
    except BadSignatureError:
        return False
    except JoseError as error:
        # The shape was checked already; anything joserfc still objects to is not a valid signature.
        raise BadSignature(f"the JWS was refused: {error.description or error.error}") from None
    except ValueError:
        # e.g. an HMAC key that is empty
        return False


# --- 6-8. payload, binding, nonce ---------------------------------------------------------


def _payload_object(request: _Flattened) -> dict[str, Any]:
    try:
        text = request.payload.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJSON("the payload is not UTF-8 text") from None
    payload = load_json(text, "the payload", MalformedJSON)
    if not isinstance(payload, dict):
        raise MalformedJSON("the payload must be a JSON object")
    return payload


def _check_binding(
    binding: _Binding, *, url: str, agent: AgentIdentity, consume_nonce: Callable[[str], bool]
) -> None:
    if binding.url != url:
        raise UrlMismatch(f"the request was signed for {_clip(binding.url)} but sent to {_clip(url)}")
    if binding.agent_thumbprint != agent.thumbprint:
        raise BindingMismatch(
            "x5t#S256 does not match the TLS client certificate of this connection: the request was "
            "signed for another user server"
        )
    if not consume_nonce(binding.nonce):
        raise BadNonce("the nonce is unknown, expired or already used; get a new one from GET /api/v1/nonce")


# --- strict JSON --------------------------------------------------------------------------


def load_json(text: str, what: str, error: type[AutoenrollError]) -> Any:
    """json.loads, refusing what another parser might read differently: duplicate keys, NaN/Infinity,
    numbers out of range, unpaired surrogates, nesting deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise error(f"{what} is nested too deeply") from None
    except ValueError as problem:  # JSONDecodeError, duplicate keys, int longer than 4300 digits, ...
        raise error(f"{what} is not valid JSON: {_clip(str(problem), 120)}") from None
    _check_tree(value, what, error)
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")
    return number


def _check_tree(value: Any, what: str, error: type[AutoenrollError]) -> None:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            for key, item in node.items():
                _check_text(key, what, error)
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check_text(node, what, error)


def _check_text(text: str, what: str, error: type[AutoenrollError]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} contains an unpaired UTF-16 surrogate escape") from None


def _clip(text: str, limit: int = 200) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: list[str]) -> str:
    return ", ".join(_clip(n, 40) for n in names[:5])
