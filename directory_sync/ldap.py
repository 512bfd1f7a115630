"""LdapDirectory: users, groups and certificates in LDAP, behind the project's error tree.

Every operation runs on a connection of one `connection.ConnectionPool` (python-ldap, thread-safe, one
retry on a fresh connection after a server restart), and every python-ldap exception comes out through
`connection.translate`: nothing outside directory_sync sees one. Attribute and object-class names come
from `settings.attributes` (config.AttributeMap) and the name fields of LdapSettings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone

import ldap
from ldap.controls.libldap import AssertionControl
from ldap.ldapobject import LDAPObject

from directory_sync.config import LdapSettings
from directory_sync.connection import Attributes, ConnectionPool, Entry, answered, bind, close, translate, values
from directory_sync.escape import check_email, filter_value, first_rdn, generalized_time, resolve_group_dn
from directory_sync.plan import Plan, Wanted, plan_values
from registration_app.core.dn import dn_key  # lenient: DNs read back from LDAP are compared, never refused
from registration_app.core.errors import AmbiguousUser, DirectoryUnavailable, SchemaRefused
from registration_app.core.model import UserEntry


@dataclass(frozen=True)
class CheckedEntry(UserEntry):
    """A UserEntry read by find_user together with the answer, for each entitlement group, of whether the
    entry is in it, nested groups included (the in-chain matching rule): groups_of needs no search."""

    groups_in_chain: frozenset[str] = frozenset()  # dn_keys of the entitlement groups the entry is in


class LdapDirectory:
    """The Directory of DESIGN.md (find_user, groups_of, publish) plus what reconcile needs.

    `entitlement_groups`: the groups requests ask about (every profile's, the recovery officers'), as DNs.
    With nested groups on a server with the in-chain matching rule (Active Directory), find_user then
    sends, with the entry's search and without waiting for it, one search per such group for the same
    address with `(memberOf:<in-chain rule>:=<group>)` in the filter: the entry and its entitlement in one
    round trip, where reading the entry and then asking for the groups of its DN took two (PERFORMANCE.md,
    "Entitlement on Active Directory")."""

    def __init__(self, settings: LdapSettings, *, entitlement_groups: Iterable[str] = ()) -> None:
        self.settings = settings
        self.attributes = settings.attributes
        self.pool = ConnectionPool(settings)
        self.entitlement_groups = tuple(sorted({dn_key(g) for g in entitlement_groups}))

    # --- lookups -------------------------------------------------------------------------------
    def find_user(self, email: str) -> UserEntry | None:
        """The single entry under users_base whose mail is `email`; None if none; AmbiguousUser if several."""
        check_email(email)
        flt = address_filter(self.settings, email)
        if self._checks_in_chain():
            return self.pool.run(lambda conn: self._find_checked(conn, flt, email))
        entries = self.pool.run(lambda conn: _search_two(conn, self.settings.users_base, flt,
                                                         self.user_attributes(), self.settings.timeout_seconds))
        if len(entries) > 1:
            raise AmbiguousUser()
        return self.user_entry(entries[0], email) if entries else None

    def _checks_in_chain(self) -> bool:
        return bool(self.entitlement_groups and self.settings.nested_groups and self.attributes.in_chain_rule)

    def _find_checked(self, conn: LDAPObject, flt: str, email: str) -> CheckedEntry | None:
        """find_user's search and one in-chain test per entitlement group, sent at once on `conn`; every
        answer is read (none left on the connection) before an error is raised."""
        base, timeout = self.settings.users_base, self.settings.timeout_seconds
        sent = [conn.search_ext(base, ldap.SCOPE_SUBTREE, flt, self.user_attributes(), sizelimit=2, timeout=timeout)]
        sent += [conn.search_ext(base, ldap.SCOPE_SUBTREE, f"(&{flt}({self.member_of_filter(group)}))", ["1.1"],
                                 sizelimit=2, timeout=timeout) for group in self.entitlement_groups]
        answers: list[list[str]] = []
        entries: list[Entry] = []
        failure: Exception | None = None
        for index, msgid in enumerate(sent):
            try:
                found = [(dn, attrs) for dn, attrs in conn.result3(msgid, all=1, timeout=timeout)[1] if dn is not None]
            except ldap.SIZELIMIT_EXCEEDED:
                failure = failure or AmbiguousUser()
                found = []
            except ldap.LDAPError as exc:
                if not answered(exc):
                    raise  # the connection itself failed: the pool closes it
                failure = failure or exc
                found = []
            if index == 0:
                entries = [(dn, {k.lower(): v for k, v in attrs.items()}) for dn, attrs in found]
            else:
                answers.append([dn_key(dn) for dn, _ in found])
        if failure is not None:
            raise failure
        if len(entries) > 1:
            raise AmbiguousUser()
        if not entries:
            return None
        user = self.user_entry(entries[0], email)
        me = dn_key(user.dn)
        inside = frozenset(g for g, dns in zip(self.entitlement_groups, answers) if me in dns)
        return CheckedEntry(**{f.name: getattr(user, f.name) for f in fields(UserEntry)}, groups_in_chain=inside)

    def attribute_values(self, dn: str, attribute: str) -> list[bytes]:
        """The raw values of one attribute of the entry `dn` (a certificate mapping attribute such as
        altSecurityIdentities, read live); empty if the entry or the attribute is not there."""
        return values(self.pool.read(dn, [attribute]) or {}, attribute)

    def groups_of(self, user: UserEntry | str) -> frozenset[str]:
        """Normalised DNs of the groups `user` belongs to, read live (memberOf or a member= search)."""
        if isinstance(user, UserEntry) and self.settings.use_memberof and not self.settings.nested_groups:
            return user.member_of  # read with the entry by find_user, in the same live search
        if isinstance(user, CheckedEntry):  # find_user asked about each entitlement group with the entry
            return user.member_of | user.groups_in_chain
        dn = user.dn if isinstance(user, UserEntry) else user
        rule = self.attributes.in_chain_rule
        if self.settings.nested_groups and rule:  # the server walks the nesting: one search
            flt = f"({self.settings.group_member_attribute}:{rule}:={filter_value(dn)})"
            return frozenset(dn_key(group) for group, _ in self.pool.paged(self.settings.groups_base, flt, ["1.1"]))
        found: set[str] = set()
        todo = self._parents(dn)
        while todo:
            group = todo.pop()
            if group in found:
                continue
            found.add(group)
            if self.settings.nested_groups:
                todo |= self._parents(group)
        return frozenset(found)

    def is_member(self, user: UserEntry | str, groups: Iterable[str]) -> bool:
        """True if the user is in any of `groups` (each a full DN, or a bare cn under groups_base)."""
        wanted = {self._group_dn(g) for g in groups}
        return bool(wanted) and not wanted.isdisjoint(self.groups_of(user))

    def members_of_group(self, group: str) -> Iterator[UserEntry]:
        """Every user of a group (DN or bare cn), by paged searches."""
        group_dn = self._group_dn(group)
        if self.settings.use_memberof and (not self.settings.nested_groups or self.attributes.in_chain_rule):
            flt = f"(&({self.settings.mail_attribute}=*)({self.member_of_filter(group_dn)}))"
            for entry in self.pool.paged(self.settings.users_base, flt, self.user_attributes()):
                yield self.user_entry(entry)
            return
        # Without memberOf (e.g. after slapadd) or when nesting: expand the member lists, then walk users.
        members = self._expanded_members(group_dn)
        flt = f"({self.settings.mail_attribute}=*)"
        for entry in self.pool.paged(self.settings.users_base, flt, self.user_attributes()):
            if dn_key(entry[0]) in members:
                yield self.user_entry(entry)

    def group_dn(self, group: str) -> str:
        """The normalised DN of a group given as a DN or as a bare cn under groups_base."""
        return self._group_dn(group)

    def group_members(self, group: str) -> set[str]:
        """Normalised DNs of a group's members from its member attribute (nested ones too when
        nested_groups): one paged search of the groups, whatever the size of the group; with the
        in-chain matching rule, one paged search of the entries under users_base that the server says are in it."""
        group_dn = self._group_dn(group)
        if self.settings.nested_groups and self.attributes.in_chain_rule:
            flt = f"({self.member_of_filter(group_dn)})"
            return {dn_key(dn) for dn, _ in self.pool.paged(self.settings.users_base, flt, ["1.1"])}
        return self._expanded_members(group_dn)

    def iter_users(self, since: datetime | None = None) -> Iterator[UserEntry]:
        """Every user with a mail address; with `since`, only entries modified at or after it (UTC if naive)."""
        flt = f"({self.settings.mail_attribute}=*)"
        if since is not None:
            when = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            flt = f"(&{flt}({self.attributes.modify_timestamp}>={generalized_time(when)}))"
        for entry in self.pool.paged(self.settings.users_base, flt, self.user_attributes()):
            yield self.user_entry(entry)

    # --- publication ---------------------------------------------------------------------------
    def publish(self, user: UserEntry | str, wanted: Wanted) -> None:
        """Bring the entry's certificate attribute to what `wanted` asks (plan.plan_values: our current
        encryption certificate first, other issuers' values kept byte for byte) in ONE modify; idempotent.

        The modify is planned against the entry as read (or as `user`, an entry this request read,
        holds it) and asserts (RFC 4528) that the entry's entryCSN is still the one read: if another
        writer changed the entry meanwhile, nothing is applied and we read and plan again.
        """
        dn = user.dn if isinstance(user, UserEntry) else user
        seen = user if isinstance(user, UserEntry) and user.version else None
        self.pool.run(lambda conn: self._publish(conn, dn, wanted, seen=seen))

    def publish_ca(self, ca_cert_der: bytes, crl_der: bytes | None = None) -> None:
        """Replace the CA entry's certificate (and CRL, if given); create the entry if it is missing."""
        names = self.attributes
        dn = self.settings.ca_dn
        replace = {names.ca_certificate: [ca_cert_der]}
        if crl_der is not None:
            replace[names.crl] = [crl_der]
            if names.authority_crl:
                replace[names.authority_crl] = [crl_der]
        naming_attribute, name = first_rdn(dn)
        entry = {"objectClass": sorted(c.encode() for c in names.ca_object_classes),
                 naming_attribute: [name.encode()], **replace}

        def work(conn: LDAPObject) -> None:
            for _ in range(2):  # a concurrent creator may win the add: then modify again
                try:
                    conn.modify_ext_s(dn, [(ldap.MOD_REPLACE, name, vals) for name, vals in replace.items()])
                    return
                except ldap.NO_SUCH_OBJECT:
                    pass
                try:
                    conn.add_ext_s(dn, list(entry.items()))
                    return
                except ldap.ALREADY_EXISTS:
                    pass

        self.pool.run(work)

    def check_bind(self) -> None:
        """A new connection bound as the service account now, then closed (a pooled one may have been
        bound before the directory stopped accepting our credentials): DirectoryUnavailable (or
        DirectoryTlsFailed) says why not. What /health asks."""
        try:
            close(bind(self.settings, self.pool.credentials))
        except ldap.LDAPError as exc:
            raise translate(exc) from exc

    def close(self) -> None:
        self.pool.close()

    # --- entries -------------------------------------------------------------------------------
    def user_attributes(self) -> list[str]:
        """The attributes `user_entry` reads (memberOf only where the overlay maintains it)."""
        names = self.attributes
        attrs = [self.settings.mail_attribute, *sorted(self.settings.also_find_by), names.common_name,
                 names.certificate, names.version, self.settings.entry_id_attribute]
        return attrs + ([names.member_of] if self.settings.use_memberof else [])

    def user_entry(self, entry: Entry, email: str | None = None) -> UserEntry:
        """A UserEntry from an entry read with `user_attributes`; `email` picks among several mail values."""
        dn, attrs = entry
        names = self.attributes
        mails = [v.decode() for v in values(attrs, self.settings.mail_attribute)]
        matching = [m for m in addresses(self.settings, attrs) if email is not None and m.lower() == email.lower()]
        common_names = [v.decode() for v in values(attrs, names.common_name)]
        return UserEntry(
            dn=dn,
            email=(matching or mails or [email or ""])[0],
            common_name=common_names[0] if common_names else "",
            member_of=frozenset(dn_key(v.decode()) for v in values(attrs, names.member_of)),
            certificates=tuple(values(attrs, names.certificate)),
            version=b"".join(values(attrs, names.version)[:1]).decode("ascii", "replace"),
            entry_id=entry_id_text(values(attrs, self.settings.entry_id_attribute)),
        )

    def modify_operations(self, plan: Plan, *, add_class: bool = False, whole: bool = False) -> list[tuple]:
        """python-ldap's modlist for one plan: the deletes, then the adds in order, in one modify;
        `add_class`: the auxiliary class that allows the attribute (pkiUser) is added in it too;
        `whole`: the attribute replaced by the plan's target values instead (an attribute without an
        equality rule, such as userSMIMECertificate, cannot have values deleted one by one)."""
        attribute = self.attributes.certificate
        auxiliary = self.attributes.certificate_object_class
        change = [(ldap.MOD_REPLACE, attribute, list(plan.target) or None)] if whole else \
            ([(ldap.MOD_DELETE, attribute, list(plan.deletes))] if plan.deletes else []) + \
            ([(ldap.MOD_ADD, attribute, list(plan.adds))] if plan.adds else [])
        return ([(ldap.MOD_ADD, "objectClass", [auxiliary.encode()])] if add_class and plan.adds else []) + change

    # --- helpers -------------------------------------------------------------------------------
    def _group_dn(self, group: str) -> str:
        return resolve_group_dn(group, self.settings.groups_base)

    def member_of_filter(self, group_dn: str) -> str:
        """The filter item (without parentheses) for members of `group_dn`: memberOf=<group>, or
        memberOf:<in-chain rule>:=<group> when nesting on a server that has the rule."""
        rule = self.attributes.in_chain_rule if self.settings.nested_groups else ""
        return f"{self.attributes.member_of}{f':{rule}:' if rule else ''}={filter_value(group_dn)}"

    def _parents(self, dn: str) -> set[str]:
        """Groups that list `dn` as a direct member."""
        if self.settings.use_memberof:
            member_of = self.attributes.member_of
            return {dn_key(v.decode()) for v in values(self.pool.read(dn, [member_of]) or {}, member_of)}
        flt = f"({self.settings.group_member_attribute}={filter_value(dn)})"
        return {dn_key(dn) for dn, _ in self.pool.paged(self.settings.groups_base, flt, ["1.1"])}

    def _expanded_members(self, group_dn: str) -> set[str]:
        """Normalised member DNs of a group; with nested_groups, members of member groups too."""
        attr = self.settings.group_member_attribute
        members: dict[str, set[str]] = {
            dn_key(dn): {dn_key(v.decode()) for v in values(attrs, attr)}
            for dn, attrs in self.pool.paged(self.settings.groups_base, f"({attr}=*)", [attr])
        }
        result: set[str] = set()
        todo, seen = [group_dn], set()
        while todo:
            group = todo.pop()
            if group in seen:
                continue
            seen.add(group)
            for member in members.get(group, ()):
                result.add(member)
                if self.settings.nested_groups and member in members:
                    todo.append(member)
        return result

    def _publish(self, conn: LDAPObject, dn: str, wanted: Wanted, *, seen: UserEntry | None = None) -> None:
        """`publish` on one connection: plan, then one modify asserting the entryCSN.

        `seen` (the entry as this request read it, with its entryCSN) spares the first read (but not the
        conclusion that nothing is to be done, which only a fresh read can tell). A modify
        refused because the entry changed (assertion failed, or a value to delete is gone or one to add is
        there) is planned again on a fresh read. A server that does not take the assertion control gets
        the same modify without it: deleting by value still refuses to apply over a concurrent removal.
        """
        names = self.attributes
        asserting, fresh, add_class, whole = True, seen is None, False, False
        current, version = (list(seen.certificates), seen.version) if seen is not None else (None, None)
        for _ in range(5):
            if current is None:
                fresh = True
                found = conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", [names.certificate, names.version],
                                          timeout=self.settings.timeout_seconds)
                attrs: Attributes = {k.lower(): v for k, v in found[0][1].items()} if found else {}
                current = values(attrs, names.certificate)
                version = b"".join(values(attrs, names.version)[:1]).decode("ascii", "replace")
            plan = plan_values(current, wanted)
            if not plan.changes:
                if fresh:
                    return
                current = None  # nothing to do on the entry as the request read it: make sure it still is so
                continue
            controls = [AssertionControl(True, f"({names.version}={filter_value(version)})")] \
                if asserting and version else None
            try:
                conn.modify_ext_s(dn, self.modify_operations(plan, add_class=add_class, whole=whole),
                                  serverctrls=controls)
                return
            except ldap.INAPPROPRIATE_MATCHING:
                # No equality rule: values cannot be deleted by value. Replace the whole attribute with
                # the plan's target, which keeps other issuers' values as read; the assertion on the
                # entry's change stamp keeps a concurrent writer's change from being overwritten.
                if whole:
                    raise
                whole = True
                continue
            except ldap.OBJECT_CLASS_VIOLATION as exc:
                # The entry's classes do not allow the attribute: the same modify again with the
                # auxiliary class added, once; refused with it (or without one to add): for good.
                if add_class or not names.certificate_object_class or not plan.adds:
                    raise self._schema_refused(dn, exc) from exc
                add_class = True
                continue
            except (ldap.INVALID_SYNTAX, ldap.UNDEFINED_TYPE, ldap.INSUFFICIENT_ACCESS) as exc:
                if add_class:  # the directory does not know the auxiliary class, or we may not add it
                    raise self._schema_refused(dn, exc) from exc
                raise
            except (ldap.CONSTRAINT_VIOLATION, ldap.SIZELIMIT_EXCEEDED, ldap.ADMINLIMIT_EXCEEDED) as exc:
                raise self._schema_refused(dn, exc) from exc  # e.g. a value larger than the attribute takes
            except ldap.UNAVAILABLE_CRITICAL_EXTENSION:
                asserting = False  # no assertions on this server: plan again, modify without
            except (ldap.ASSERTION_FAILED, ldap.TYPE_OR_VALUE_EXISTS, ldap.NO_SUCH_ATTRIBUTE):
                pass  # another writer changed the entry since it was read
            current = None
        raise DirectoryUnavailable("The directory entry keeps changing; try again later")


    def _schema_refused(self, dn: str, exc: ldap.LDAPError) -> SchemaRefused:
        info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        said = "; ".join(str(info[k]) for k in ("desc", "info") if info.get(k)) or type(exc).__name__
        return SchemaRefused(f"The directory refused {self.attributes.certificate} on {dn}: {said}",
                             ldap_result=str(info.get("desc", type(exc).__name__)), dn=dn)


PROXY_ADDRESSES = "proxyaddresses"
_SMTP = ("smtp:", "SMTP:")  # SMTP: the primary address, smtp: the aliases (Exchange)


def address_filter(settings: LdapSettings, email: str) -> str:
    """The filter that finds the entry of `email`: mail_attribute, or any of `also_find_by` too
    (proxyAddresses by its smtp:/SMTP: values, any other attribute by the address itself)."""
    value = filter_value(email)
    terms = [f"({settings.mail_attribute}={value})"]
    for name in sorted(settings.also_find_by):
        if name.lower() == PROXY_ADDRESSES:
            terms += [f"({name}={prefix}{value})" for prefix in _SMTP]
        else:
            terms.append(f"({name}={value})")
    return terms[0] if len(terms) == 1 else f"(|{''.join(terms)})"


def addresses(settings: LdapSettings, attrs: Attributes) -> list[str]:
    """Every address the entry answers to: its mail values, then those of `also_find_by` (proxyAddresses
    values without their smtp: prefix; X400: and other types are not mail addresses)."""
    found = [v.decode() for v in values(attrs, settings.mail_attribute)]
    for name in sorted(settings.also_find_by):
        for raw in values(attrs, name):
            text = raw.decode("utf-8", "replace")
            if name.lower() != PROXY_ADDRESSES:
                found.append(text)
            elif text[:5].lower() == "smtp:":
                found.append(text[5:])
    return found


def entry_id_text(raw: list[bytes]) -> str:
    """An entry id as text: entryUUID is a string already; AD's objectGUID is 16 bytes (little-endian
    GUID), shown the way AD tools show it. Empty if the entry has none."""
    if not raw:
        return ""
    value = raw[0]
    if len(value) == 16 and not all(0x20 <= b < 0x7F for b in value):
        return str(uuid.UUID(bytes_le=value))
    return value.decode("utf-8", "replace")


def _search_two(conn: LDAPObject, base: str, flt: str, attributes: list[str], timeout: float) -> list[Entry]:
    """Up to two entries: enough to know an address is ambiguous."""
    try:
        found = conn.search_ext_s(base, ldap.SCOPE_SUBTREE, flt, attributes, sizelimit=2, timeout=timeout)
    except ldap.SIZELIMIT_EXCEEDED:
        raise AmbiguousUser() from None  # more than two entries
    return [(dn, {k.lower(): v for k, v in attrs.items()}) for dn, attrs in found if dn is not None]
