"""An in-process server platform for directory_sync tests: CA, KRA and database in a temporary folder,
wired by build_services to a real slapd (no LDAP mocks), plus bulk users loaded with slapadd."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

from bench.postgres import database_url_for
from registration_app.authorities.pki_files import PkiPaths, create_pki, create_server_keys
from registration_app.core.ports import Directory
from registration_app.wiring import Services, build_services
from registration_app.settings import Settings

GROUPS = "ou=groups,dc=example,dc=org"
PEOPLE = "ou=people,dc=example,dc=org"
PASSPHRASE = b"test-passphrase-not-secret"


def make_services(data: Path, ldap_settings, *, directory: Directory | None = None, **overrides) -> Services:
    """CA + KRA + sqlite in `data`, LDAP from `ldap_settings` (PrivateSlapd.settings()), or the given
    `directory` (tests/ra/fakes.py InMemoryDirectory)."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_store = overrides.get("key_store")
    if not PkiPaths.in_dir(data).ca_cert.exists():
        token = None
        if key_store is not None and key_store.in_token:  # keys generated in a token (tests/softhsm.py)
            from registration_app.authorities.pkcs11_store import Token
            token = Token(key_store.module, key_store.token, data / key_store.pin_file)
        create_pki(data, passphrase=PASSPHRASE, now=datetime.now(timezone.utc), token=token,
                   in_token=key_store.in_token if key_store is not None else frozenset())
    create_server_keys(data)
    if "database_url" not in overrides:
        overrides["database_url"] = database_url_for() or ""
    settings = dataclasses.replace(Settings(), data_dir=data, ca_passphrase=PASSPHRASE.decode(),
                                   http_url="http://127.0.0.1:9/", ldap=ldap_settings, **overrides)
    services = build_services(settings, directory=directory)
    services.publisher.ca = services.ca
    return services


def profiles_for(group_dn: str) -> dict:
    """The default profiles, entitled by `group_dn` only (so tests on the shared slapd do not meet)."""
    from registration_app.core.profiles import parse_profiles
    from registration_app.settings import DEFAULT_PROFILES
    return parse_profiles({name: {**table, "groups": [group_dn]} for name, table in DEFAULT_PROFILES.items()})


def add_group(ldap_admin, cn: str, members: list[str]) -> str:
    """A groupOfNames made over LDAP (so that the memberOf overlay fills the members' memberOf)."""
    dn = f"cn={cn},{GROUPS}"
    assert ldap_admin.add(dn, ["groupOfNames"], {"cn": cn, "member": members}), ldap_admin.result
    return dn


def issue(services: Services, email: str, profile: str = "smime-encryption-ec", now=None):
    """An encryption certificate through the in-process key authority (what the RA does after its checks)."""
    from registration_app.authorities.key_authority import IssueRequest
    user = services.directory.find_user(email)
    return services.key_authority.issue(IssueRequest(
        user=user, profile=services.settings.profiles[profile], actor="test", password="pw"), now=now)
