"""In-memory implementations of the Protocols of registration_app/core/ports.py, for unit tests of RA
policy without slapd or gunicorn. Each is a faithful implementation (mypy checks it against its
Protocol: setup.cfg), not a mock: state goes in, the same rules as the real one apply, state comes out.
The end-to-end tests show the same behaviour against the real directory and server."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from directory_sync.escape import check_email
from directory_sync.plan import plan_values
from registration_app.core.dn import dn_key
from registration_app.core.errors import AmbiguousUser, DirectoryUnavailable, UserNotFound
from registration_app.core.model import UserEntry, Wanted


@dataclass
class _Entry:
    dn: str
    mail: str
    common_name: str
    entry_id: str
    certificates: list[bytes] = field(default_factory=list)
    attributes: dict[str, list[bytes]] = field(default_factory=dict)  # other attributes, by lower-case name
    version: int = 1  # the change stamp (entryCSN): every change makes it another


class InMemoryDirectory:
    """The user directory as LdapDirectory presents it (the `openldap` preset, memberOf read with the
    entry): one entry per address or AmbiguousUser, groups as normalised DNs (nested ones followed when
    `nested_groups`), the certificate attribute written by the publication planner (directory_sync/plan.py)
    in one change, the CA entry's certificate and CRL replaced."""

    CERTIFICATE = "usercertificate;binary"

    def __init__(self, *, nested_groups: bool = False) -> None:
        self.nested_groups = nested_groups
        self.entries: dict[str, _Entry] = {}  # by dn_key
        self.members: dict[str, set[str]] = {}  # group dn_key -> member dn_keys (users or groups)
        self.ca_entry: tuple[bytes, bytes | None] | None = None
        self.modifies = 0  # publications that changed an entry (LDAP modify operations)
        self.refusing_binds: str | None = None  # why the service account's bind fails now (None: it succeeds)

    # --- arranging (what an administrator does in the directory) -------------------------------
    def add_user(self, dn: str, mail: str, *, common_name: str = "", groups: tuple[str, ...] = ()) -> str:
        self.entries[dn_key(dn)] = _Entry(dn=dn, mail=mail, common_name=common_name or mail.split("@")[0],
                                          entry_id=str(uuid.uuid4()))
        for group in groups:
            self.add_member(group, dn)
        return dn

    def add_member(self, group_dn: str, member_dn: str) -> None:
        self.members.setdefault(dn_key(group_dn), set()).add(dn_key(member_dn))
        self._touch(member_dn)

    def remove_member(self, group_dn: str, member_dn: str) -> None:
        self.members.get(dn_key(group_dn), set()).discard(dn_key(member_dn))
        self._touch(member_dn)

    def certificates_of(self, dn: str) -> list[bytes]:
        return list(self.entries[dn_key(dn)].certificates)

    def _touch(self, dn: str) -> None:
        entry = self.entries.get(dn_key(dn))
        if entry is not None:
            entry.version += 1

    def _entry(self, user: UserEntry | str) -> _Entry:
        entry = self.entries.get(dn_key(user.dn if isinstance(user, UserEntry) else user))
        if entry is None:
            raise UserNotFound(f"no directory entry {user.dn if isinstance(user, UserEntry) else user}")
        return entry

    # --- the Directory Protocol ----------------------------------------------------------------
    def find_user(self, email: str) -> UserEntry | None:
        check_email(email)
        found = [e for e in self.entries.values() if e.mail.lower() == email.lower()]
        if len(found) > 1:
            raise AmbiguousUser()
        if not found:
            return None
        entry = found[0]
        return UserEntry(dn=entry.dn, email=entry.mail, common_name=entry.common_name,
                         member_of=self.groups_of(entry.dn), certificates=tuple(entry.certificates),
                         version=str(entry.version), entry_id=entry.entry_id)

    def groups_of(self, user: UserEntry | str) -> frozenset[str]:
        member = dn_key(user.dn if isinstance(user, UserEntry) else user)
        found: set[str] = set()
        todo = {group for group, members in self.members.items() if member in members}
        while todo:
            group = todo.pop()
            if group in found:
                continue
            found.add(group)
            if self.nested_groups:
                todo |= {parent for parent, members in self.members.items() if group in members}
        return frozenset(found)

    def attribute_values(self, dn: str, attribute: str) -> list[bytes]:
        entry = self.entries.get(dn_key(dn))
        if entry is None:
            return []
        if attribute.lower() in (self.CERTIFICATE, "usercertificate"):
            return list(entry.certificates)
        return list(entry.attributes.get(attribute.lower(), []))

    def publish(self, user: UserEntry | str, wanted: Wanted) -> None:
        entry = self._entry(user)
        plan = plan_values(entry.certificates, wanted)
        if plan.changes:
            entry.certificates = list(plan.target)
            entry.version += 1
            self.modifies += 1

    def publish_ca(self, ca_cert_der: bytes, crl_der: bytes | None = None) -> None:
        kept_crl = self.ca_entry[1] if self.ca_entry is not None else None
        self.ca_entry = (ca_cert_der, crl_der if crl_der is not None else kept_crl)

    def check_bind(self) -> None:
        if self.refusing_binds is not None:
            raise DirectoryUnavailable(self.refusing_binds)


if TYPE_CHECKING:
    from registration_app.core.ports import Directory

    _directory: Directory = InMemoryDirectory()
