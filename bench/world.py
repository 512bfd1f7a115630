"""Users for benchmarks and suites: LDIF for `slapadd -q`, and signature certificates minted with the
platform's own CA key (what `autoenroll-agent bootstrap` would have given each user, without the
one-request-per-user cost of inviting and bootstrapping thousands of them)."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from directory_sync.config import SUFFIX

GROUP = "smime-users"
GROUP_DN = f"cn={GROUP},ou=groups,{SUFFIX}"
PEOPLE = f"ou=people,{SUFFIX}"


@dataclass(frozen=True)
class User:
    uid: str
    email: str
    dn: str
    key: object = None  # the signature key (EC P-256)
    chain: tuple[x509.Certificate, ...] = ()  # signature certificate + CA


def user_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE}"


def users_ldif(uids: list[str], *, group_members: list[str] | None = None, group: bool = True,
               entry_uuids: bool = False) -> str:
    """LDIF of user entries, the one builder of the suites and the benchmarks. With `group`: the entitling
    group with `group_members` (default: all) as members, and their memberOf written in, since slapadd
    (slapd.bulk_load) bypasses the overlay; without, the users alone (for slapd.load over LDAP, or a
    group made later). `entry_uuids`: an entryUUID derived from the DN, so that two directories loaded
    with the same LDIF hold the same entries (a replica). The entries must not exist yet."""
    members = uids if group_members is None else group_members
    member_set = set(members) if group else set()
    parts = []
    for uid in uids:
        entry = (f"dn: {user_dn(uid)}\nobjectClass: inetOrgPerson\nobjectClass: pkiUser\nuid: {uid}\n"
                 f"cn: User {uid}\nsn: {uid}\nmail: {uid}@example.org\n")
        if entry_uuids:
            entry += f"entryUUID: {uuid.uuid5(uuid.NAMESPACE_URL, user_dn(uid))}\n"
        if uid in member_set:
            entry += f"memberOf: {GROUP_DN}\n"
        parts.append(entry)
    if group:
        lines = [f"dn: {GROUP_DN}", "objectClass: groupOfNames", f"cn: {GROUP}"]
        lines += [f"entryUUID: {uuid.uuid5(uuid.NAMESPACE_URL, GROUP_DN)}"] if entry_uuids else []
        lines += [f"member: {user_dn(uid)}" for uid in members] or [f"member: cn=nobody,{SUFFIX}"]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def add_users(slapd, uids: list[str]) -> list[str]:
    """The users of `uids` added over LDAP (PrivateSlapd.load, so that the memberOf overlay sees the groups
    made for them later), without a group; their DNs."""
    slapd.load(users_ldif(uids, group=False))
    return [user_dn(uid) for uid in uids]


def new_uids(n: int, prefix: str | None = None) -> list[str]:
    prefix = prefix or "b" + secrets.token_hex(3)
    return [f"{prefix}-{i:06d}" for i in range(n)]


class Minter:
    """Signs users' signature certificates with the platform's CA key (data_dir/ca.key)."""

    def __init__(self, data_dir: Path, passphrase: bytes):
        from registration_app.authorities.certs import CaUrls
        from registration_app.authorities.pki_files import read_cert, read_private_key
        from registration_app.settings import DEFAULT_PROFILES
        from registration_app.core.profiles import parse_profiles
        self.ca_cert = read_cert(data_dir / "ca.pem")
        if (data_dir / "ca.key").exists():
            self.ca_key = read_private_key(data_dir / "ca.key", passphrase)
        else:  # the CA key is in a token (bench (10)): it signs the users' certificates there
            from registration_app.wiring import key_store
            from registration_app.settings import load_settings
            self.ca_key = key_store(load_settings(data_dir / "autoenroll.toml")).ca_signing_key()
        self.urls = CaUrls(crl_url="http://127.0.0.1/crl/ca.crl", ca_issuers_url="http://127.0.0.1/ca.crt")
        self.profile = parse_profiles(DEFAULT_PROFILES)["smime-signature"]

    def user(self, uid: str, *, email: str | None = None, now: datetime | None = None,
             days: int = 365) -> User:
        from registration_app.authorities.certs import build_smime_certificate
        from registration_app.core.model import Subject
        email = email or f"{uid}@example.org"
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or datetime.now(timezone.utc)
        profile = self.profile if days == self.profile.validity_days else \
            type(self.profile)(**{**self.profile.__dict__, "validity_days": days})
        cert = build_smime_certificate(ca_cert=self.ca_cert, ca_key=self.ca_key, public_key=key.public_key(),
                                       profile=profile, subject=Subject(email=email), now=now, urls=self.urls)
        return User(uid=uid, email=email, dn=user_dn(uid), key=key, chain=(cert, self.ca_cert))

    def users(self, uids: list[str]) -> list[User]:
        return [self.user(uid) for uid in uids]


def past(days: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(days=days)
