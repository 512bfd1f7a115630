"""Immutable domain values shared by every part."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Usage(str, enum.Enum):
    """What a certificate is for; decides key usage, escrow and publication."""

    SIGNATURE = "signature"
    ENCRYPTION = "encryption"


class KeyType(str, enum.Enum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_rsa(self) -> bool:
        return self is not KeyType.EC_P256


class KeySource(str, enum.Enum):
    SERVER = "server"  # the key authority generates the key pair
    CLIENT = "client"  # the agent sends a CSR (proof of possession)
    EITHER = "either"


@dataclass(frozen=True)
class Profile:
    """A certificate profile and who may obtain it (loaded from TOML, see core/profiles.py)."""

    name: str
    usage: Usage
    key_type: KeyType = KeyType.EC_P256
    key_source: KeySource = KeySource.SERVER
    validity_days: int = 365
    groups: frozenset[str] = frozenset()  # group DNs or cns; empty = nobody
    keep_superseded: bool = False  # keep superseded values in LDAP until they expire
    renew_window_days: int = 60  # renewal allowed when fewer days than this remain (or 1/3 of life)
    max_per_day: int = 10  # rate limit per user and profile
    coexist: bool = False  # encryption: may be current beside another encryption profile's certificate

    @property
    def escrowed(self) -> bool:
        return self.usage is Usage.ENCRYPTION


@dataclass(frozen=True)
class Subject:
    """What goes into a certificate: the mailbox, and the display name for the CN."""

    email: str
    common_name: str | None = None


@dataclass(frozen=True)
class UserEntry:
    """The single directory entry of a user (found by the email of their certificate)."""

    dn: str
    email: str
    common_name: str
    member_of: frozenset[str] = frozenset()  # group DNs when the directory returned them inline
    certificates: tuple[bytes, ...] = ()  # current userCertificate;binary values, DER
    # The entry's change stamp when it was read (OpenLDAP's entryCSN; empty if the directory has none):
    # publication may plan against `certificates` and assert the entry is unchanged instead of reading it.
    version: str = ""
    # The entry's stable identity (OpenLDAP entryUUID, AD objectGUID; empty if the directory has none):
    # a certificate is bound to the entry that held its address when it was issued, not to the address.
    entry_id: str = ""


@dataclass(frozen=True)
class Wanted:
    """What our records ask of one directory entry: our values to show, in order, and ours to remove
    (planned by directory_sync/plan.py, written by Directory.publish)."""

    first: tuple[bytes, ...] = ()  # our encryption certificates, current first
    last: tuple[bytes, ...] = ()  # our other certificates (signature)
    remove: frozenset[bytes] = frozenset()

    @property
    def shown(self) -> tuple[bytes, ...]:
        return self.first + self.last


@dataclass(frozen=True)
class RecoveryGrant:
    """Why a recovery is allowed: the owner themself, or a released m-of-n officer request."""

    kind: str  # "owner" | "officers"
    email: str  # whose keys
    actor: str  # who receives them
    request_id: str | None = None
    # The signed requests behind the grant (the user's own JWS; or the opening, approval and release
    # JWSs of the officers), so that a KRA in another process can verify the grant by itself.
    evidence: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class AgentIdentity:
    """The user server that is connected, from its verified TLS client certificate."""

    subject: str
    names: frozenset[str]  # DNS/email/URI SANs and the subject CN
    certificate_der: bytes
    thumbprint: str  # base64url SHA-256 of the DER: the JWS `x5t#S256` binding


@dataclass(frozen=True)
class UserIdentity:
    """The user, from the verified certificate chain of their JWS."""

    email: str
    certificate_der: bytes
    serial: int
    not_after: datetime
    issuer_is_ours: bool
    # A certificate of another trust anchor (not ours) authenticates only the entry whose
    # `match_attribute` lists it (auth/anchors.py); `anchor` names that anchor's configuration.
    anchor: str = ""
    match_attribute: str = ""


@dataclass(frozen=True)
class VerifiedRequest:
    """A JWS whose signature, chain, nonce, url and channel binding were all checked."""

    payload: dict
    user: UserIdentity
    agent: AgentIdentity
    protected: dict = field(default_factory=dict)
    raw: bytes = b""  # the JWS as received: evidence a split-mode KRA verifies on its own
    # The nonce when it was checked but not yet marked used (store.repos.NonceToken): the service
    # records it in the transaction that acts on the request. None once it is used.
    nonce: object | None = None
    # What the database said about this request, read once (auth/request_checks.py RequestChecks): the
    # RA's entry binding answers from it instead of another read.
    checks: object | None = None
