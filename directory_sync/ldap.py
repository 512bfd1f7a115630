"""LdapDirectory: users, groups and certificates in LDAP (ldap3), behind the project's error tree.

The request path's operations (`find_user`, `publish`) use python-ldap (libldap) when it is installed:
ldap3 decodes BER in pure Python and cost about 2.6 ms of CPU per search or read+modify here, python-ldap
a tenth of that. Everything else (paged scans, groups, the CA entry) stays on ldap3.

Thread safety: each operation borrows a connection from a small pool (one thread per connection at a
time; one pool per client library), so gunicorn gthread workers can share one LdapDirectory. A connection
that broke (slapd restarted) is dropped and the operation is tried once more on a fresh one; if that fails
too the caller gets DirectoryUnavailable within `timeout_seconds`.

Errors: `_run`/`_check`/`_translate` (ldap3) and `_run_fast`/`translate_pyldap_error` (python-ldap) are the one
adapter to registration_app.core.errors; nothing outside this module sees an ldap3 or python-ldap exception.
"""

from __future__ import annotations

import math
import queue
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import TypeVar

from ldap3 import (BASE, IP_SYSTEM_DEFAULT, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE, NONE, SUBTREE, Connection,
                   Server)
from ldap3.core import exceptions as ldap_exc
from ldap3.utils.dn import parse_dn

from directory_sync.config import LdapSettings
from directory_sync.escape import check_email, filter_value, resolve_group_dn
from directory_sync.plan import Plan, Wanted, plan_values
from registration_app.core.dn import dn_key  # lenient: DNs read back from LDAP are compared, never refused
from registration_app.core.errors import AmbiguousUser, AutoenrollError, DirectoryUnavailable, UserNotFound
from registration_app.core.model import UserEntry

try:  # python-ldap: C bindings to libldap (Debian libldap2-dev + libsasl2-dev to build it)
    import ldap as _pyldap
    from ldap.controls.libldap import AssertionControl as _AssertionControl
except ImportError:  # pragma: no cover - exercised only where python-ldap cannot be built
    _pyldap = None

T = TypeVar("T")

CERT_ATTR = "userCertificate;binary"
VERSION_ATTR = "entryCSN"  # OpenLDAP's change stamp of an entry (see UserEntry.version)
CA_CERT_ATTR = "cACertificate;binary"
CRL_ATTR = "certificateRevocationList;binary"
PAGE_SIZE = 500
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

SUCCESS, SIZE_LIMIT_EXCEEDED, NO_SUCH_ATTRIBUTE, ATTRIBUTE_OR_VALUE_EXISTS = 0, 4, 16, 20
NO_SUCH_OBJECT, ENTRY_ALREADY_EXISTS = 32, 68
# Result codes that say "the server cannot serve right now", as opposed to "it refuses this".
_TRANSIENT = {1, 3, 11, 51, 52, 80}

# ldap3 raises these when the server is unreachable, hung up or too slow.
_CONNECTION_ERRORS = (ldap_exc.LDAPCommunicationError, ldap_exc.LDAPResponseTimeoutError,
                      ldap_exc.LDAPSocketOpenError, ldap_exc.LDAPStartTLSError)


class LdapDirectory:
    """The Directory of DESIGN.md (find_user, groups_of, publish) plus what reconcile needs."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._fast_idle: queue.LifoQueue = queue.LifoQueue()  # python-ldap connections

    # --- lookups -------------------------------------------------------------------------------
    def find_user(self, email: str) -> UserEntry | None:
        """The single entry under users_base whose mail is `email`; None if none; AmbiguousUser if several."""
        check_email(email)
        flt = f"({self.settings.mail_attribute}={filter_value(email)})"
        if _pyldap is not None:
            entries = self._run_fast(lambda conn: _fast_search(conn, self.settings.users_base, flt,
                                                                  self._user_attributes(), self.settings))
            if len(entries) > 1:
                raise AmbiguousUser()
            return self._user_entry(entries[0], email) if entries else None

        def work(conn: Connection) -> list[dict]:
            # Two results are enough to know it is ambiguous.
            conn.search(self.settings.users_base, flt, SUBTREE, attributes=self._user_attributes(),
                        size_limit=2)
            _check(conn, SIZE_LIMIT_EXCEEDED)
            return _entries(conn)

        entries = self._run(work)
        if len(entries) > 1:
            raise AmbiguousUser()
        return self._user_entry(entries[0], email) if entries else None

    def attribute_values(self, dn: str, attribute: str) -> list[bytes]:
        """The raw values of one attribute of the entry `dn` (a certificate mapping attribute such as
        altSecurityIdentities, read live); empty if the entry or the attribute is not there."""
        def work(conn: Connection) -> list[dict]:
            conn.search(dn, "(objectClass=*)", BASE, attributes=[attribute])
            _check(conn, NO_SUCH_OBJECT)
            return _entries(conn)

        return [v for entry in self._run(work) for v in _values(entry, attribute)]

    def groups_of(self, user: UserEntry | str) -> frozenset[str]:
        """Normalised DNs of the groups `user` belongs to, read live (memberOf or a member= search)."""
        if isinstance(user, UserEntry) and self.settings.use_memberof and not self.settings.nested_groups:
            return user.member_of  # read with the entry by find_user, in the same live search
        dn = user.dn if isinstance(user, UserEntry) else user
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
        if self.settings.use_memberof and not self.settings.nested_groups:
            flt = f"(&({self.settings.mail_attribute}=*)(memberOf={filter_value(group_dn)}))"
            for entry in self._paged(self.settings.users_base, flt, self._user_attributes()):
                yield self._user_entry(entry)
            return
        # Without memberOf (e.g. after slapadd) or when nesting: expand the member lists, then walk users.
        members = self._expanded_members(group_dn)
        flt = f"({self.settings.mail_attribute}=*)"
        for entry in self._paged(self.settings.users_base, flt, self._user_attributes()):
            if dn_key(entry["dn"]) in members:
                yield self._user_entry(entry)

    def group_dn(self, group: str) -> str:
        """The normalised DN of a group given as a DN or as a bare cn under groups_base."""
        return self._group_dn(group)

    def group_members(self, group: str) -> set[str]:
        """Normalised DNs of a group's members from its member attribute (nested ones too when
        nested_groups): one paged search of the groups, whatever the size of the group."""
        return self._expanded_members(self._group_dn(group))

    def iter_users(self, since: datetime | None = None) -> Iterator[UserEntry]:
        """Every user with a mail address; with `since`, only entries modified at or after it (UTC if naive)."""
        flt = f"({self.settings.mail_attribute}=*)"
        if since is not None:
            when = (since if since.tzinfo else since.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
            flt = f"(&{flt}(modifyTimestamp>={when:%Y%m%d%H%M%SZ}))"
        for entry in self._paged(self.settings.users_base, flt, self._user_attributes()):
            yield self._user_entry(entry)

    # --- publication ---------------------------------------------------------------------------
    def publish(self, user: UserEntry | str, wanted: Wanted) -> None:
        """Bring the entry's userCertificate;binary to what `wanted` asks (plan.plan_values: our current
        encryption certificate first, other issuers' values kept byte for byte) in ONE modify; idempotent.

        The modify is planned against the entry as read (or as `user`, an entry this request read,
        holds it) and asserts (RFC 4528) that the entry's entryCSN is still the one read: if another
        writer changed the entry meanwhile, nothing is applied and we read and plan again.
        """
        dn = user.dn if isinstance(user, UserEntry) else user
        if _pyldap is not None:
            seen = user if isinstance(user, UserEntry) and user.version else None
            self._run_fast(lambda conn: _fast_publish(conn, dn, wanted, self.settings, seen=seen))
            return

        def work(conn: Connection) -> None:
            for _ in range(3):
                conn.search(dn, "(objectClass=*)", BASE, attributes=[CERT_ATTR])
                _check(conn)
                current = _values(_entries(conn)[0], CERT_ATTR) if conn.response else []
                plan = plan_values(current, wanted)
                if not plan.changes:
                    return
                ops = [(MODIFY_DELETE, list(plan.deletes))] if plan.deletes else []
                ops += [(MODIFY_ADD, list(plan.adds))] if plan.adds else []
                conn.modify(dn, {CERT_ATTR: ops})
                if _check(conn, NO_SUCH_ATTRIBUTE, ATTRIBUTE_OR_VALUE_EXISTS) == SUCCESS:
                    return
            raise DirectoryUnavailable("The directory entry keeps changing; try again later")

        self._run(work)

    def publish_ca(self, ca_cert_der: bytes, crl_der: bytes | None = None) -> None:
        """Replace the CA entry's certificate (and CRL, if given); create the entry if it is missing."""
        dn = self.settings.ca_entry_dn
        changes = {CA_CERT_ATTR: [(MODIFY_REPLACE, [ca_cert_der])]}
        if crl_der is not None:
            changes[CRL_ATTR] = [(MODIFY_REPLACE, [crl_der])]

        def work(conn: Connection) -> None:
            for _ in range(2):  # a concurrent creator may win the add: then modify again
                conn.modify(dn, changes)
                if _check(conn, NO_SUCH_OBJECT) == SUCCESS:
                    return
                attributes = {"objectClass": ["applicationProcess", "pkiCA"], "cn": _first_rdn_value(dn),
                              CA_CERT_ATTR: [ca_cert_der]}
                if crl_der is not None:
                    attributes[CRL_ATTR] = [crl_der]
                conn.add(dn, attributes=attributes)
                if _check(conn, ENTRY_ALREADY_EXISTS) == SUCCESS:
                    return

        self._run(work)

    def close(self) -> None:
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                _close_fast(self._fast_idle.get_nowait())
            except queue.Empty:
                return

    # --- helpers -------------------------------------------------------------------------------
    def _user_attributes(self) -> list[str]:
        attrs = [self.settings.mail_attribute, "cn", CERT_ATTR, VERSION_ATTR, self.settings.entry_id_attribute]
        return attrs + (["memberOf"] if self.settings.use_memberof else [])

    def _user_entry(self, entry: dict, email: str | None = None) -> UserEntry:
        mails = [v.decode() for v in _values(entry, self.settings.mail_attribute)]
        matching = [m for m in mails if email is not None and m.lower() == email.lower()]
        names = [v.decode() for v in _values(entry, "cn")]
        return UserEntry(
            dn=entry["dn"],
            email=(matching or mails or [email or ""])[0],
            common_name=names[0] if names else "",
            member_of=frozenset(dn_key(v.decode()) for v in _values(entry, "memberOf")),
            certificates=tuple(_values(entry, CERT_ATTR)),
            version=b"".join(_values(entry, VERSION_ATTR)[:1]).decode("ascii", "replace"),
            entry_id=entry_id_text(_values(entry, self.settings.entry_id_attribute)),
        )

    def _group_dn(self, group: str) -> str:
        return resolve_group_dn(group, self.settings.groups_base)

    def _parents(self, dn: str) -> set[str]:
        """Groups that list `dn` as a direct member."""
        if self.settings.use_memberof:
            def work(conn: Connection) -> list[dict]:
                conn.search(dn, "(objectClass=*)", BASE, attributes=["memberOf"])
                _check(conn, NO_SUCH_OBJECT)
                return _entries(conn)

            return {dn_key(v.decode()) for e in self._run(work) for v in _values(e, "memberOf")}
        flt = f"({self.settings.group_member_attribute}={filter_value(dn)})"
        return {dn_key(e["dn"]) for e in self._paged(self.settings.groups_base, flt, ["1.1"])}

    def _expanded_members(self, group_dn: str) -> set[str]:
        """Normalised member DNs of a group; with nested_groups, members of member groups too."""
        attr = self.settings.group_member_attribute
        members: dict[str, set[str]] = {
            dn_key(e["dn"]): {dn_key(v.decode()) for v in _values(e, attr)}
            for e in self._paged(self.settings.groups_base, f"({attr}=*)", [attr])
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

    # --- the adapter: connections, retries, errors ---------------------------------------------
    def _acquire(self) -> tuple[Connection, bool]:
        """(connection, reused): an idle pooled connection, else a new bound one."""
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        s = self.settings
        # A Server per connection: ldap3's Server is not thread-safe and, in its default mode, shuns an
        # address for 5 s after a failed connect, which would outlast a slapd restart.
        server = Server(s.url, connect_timeout=s.timeout_seconds, get_info=NONE, mode=IP_SYSTEM_DEFAULT)
        # ldap3 packs receive_timeout into SO_RCVTIMEO as whole seconds: it must be an int.
        conn = Connection(server, user=s.bind_dn, password=s.password,
                          receive_timeout=max(1, math.ceil(s.timeout_seconds)),
                          raise_exceptions=False, return_empty_attributes=False)
        try:
            bound = conn.bind()
        except BaseException:
            _close(conn)
            raise
        if not bound:
            _close(conn)
            raise ldap_exc.LDAPBindError(conn.result.get("description", "bind failed"))
        return conn, False

    def _release(self, conn: Connection) -> None:
        if self._idle.qsize() < self.settings.pool_size:
            self._idle.put(conn)
        else:
            _close(conn)

    def _run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` on a pooled connection; a stale pooled connection gets one retry on a fresh one."""
        while True:
            conn, reused = self._acquire_or_translate()
            try:
                result = work(conn)
            except ldap_exc.LDAPException as exc:
                _close(conn)
                if reused and _stale(exc):
                    continue  # e.g. slapd restarted since this connection was opened
                raise _translate(exc) from exc
            except AutoenrollError:
                self._release(conn)  # an LDAP result we turned into an error: the connection is fine
                raise
            except BaseException:
                _close(conn)
                raise
            self._release(conn)
            return result

    def _paged(self, base: str, flt: str, attributes: list[str]) -> Iterator[dict]:
        """Paged subtree search. The paging state lives on the connection, so one connection is held
        until the generator finishes; only the first page is retried on a fresh connection."""
        conn, reused = self._acquire_or_translate()
        cookie: bytes | None = None
        ok = False
        try:
            while True:
                try:
                    conn.search(base, flt, SUBTREE, attributes=attributes, paged_size=PAGE_SIZE,
                                paged_cookie=cookie)
                except _CONNECTION_ERRORS as exc:
                    if cookie is not None or not reused or not _stale(exc):
                        raise
                    _close(conn)  # stale after a slapd restart: start over on another connection
                    conn, reused = self._acquire_or_translate()
                    continue
                _check(conn, NO_SUCH_OBJECT)
                page, cookie = _entries(conn), _cookie(conn)
                yield from page
                if not cookie:
                    break
            ok = True
        except ldap_exc.LDAPException as exc:
            raise _translate(exc) from exc
        finally:
            if ok:
                self._release(conn)
            else:
                _close(conn)

    def _acquire_fast(self):
        """(python-ldap connection, reused): an idle pooled one, else a new bound one."""
        try:
            return self._fast_idle.get_nowait(), True
        except queue.Empty:
            pass
        try:
            conn = bound_pyldap_connection(self.settings)
        except _pyldap.LDAPError as exc:
            raise translate_pyldap_error(exc) from exc
        return conn, False

    def _run_fast(self, work: Callable[[object], T]) -> T:
        """`_run` for python-ldap: a pooled connection, one retry on a fresh one if the pooled one was stale."""
        while True:
            conn, reused = self._acquire_fast()
            try:
                result = work(conn)
            except _pyldap.LDAPError as exc:
                if _fast_result_code(exc) is None or isinstance(exc, _pyldap.TIMEOUT):
                    _close_fast(conn)  # the connection itself failed (or may hold an unread answer)
                    if reused and isinstance(exc, _pyldap.SERVER_DOWN):
                        continue  # e.g. slapd restarted since this connection was opened
                else:
                    self._release_fast(conn)  # the server answered with an error: the connection is fine
                raise translate_pyldap_error(exc) from exc
            except AutoenrollError:
                self._release_fast(conn)
                raise
            except BaseException:
                _close_fast(conn)
                raise
            self._release_fast(conn)
            return result

    def _release_fast(self, conn) -> None:
        if self._fast_idle.qsize() < self.settings.pool_size:
            self._fast_idle.put(conn)
        else:
            _close_fast(conn)

    def _acquire_or_translate(self) -> tuple[Connection, bool]:
        try:
            return self._acquire()
        except ldap_exc.LDAPException as exc:
            raise _translate(exc) from exc


def entry_id_text(raw: list[bytes]) -> str:
    """An entry id as text: entryUUID is a string already; AD's objectGUID is 16 bytes (little-endian
    GUID), shown the way AD tools show it. Empty if the entry has none."""
    if not raw:
        return ""
    value = raw[0]
    if len(value) == 16 and not all(0x20 <= b < 0x7F for b in value):
        return str(uuid.UUID(bytes_le=value))
    return value.decode("utf-8", "replace")



def _check(conn: Connection, *allowed: int) -> int:
    """The result code of the last operation if it is success or `allowed`; else the project's error."""
    code = conn.result["result"]
    if code == SUCCESS or code in allowed:
        return code
    description = conn.result.get("description", str(code))
    if code == NO_SUCH_OBJECT:
        raise UserNotFound("The directory entry does not exist")
    if code in _TRANSIENT:
        raise DirectoryUnavailable(ldap_result=description)
    # insufficientAccessRights, objectClassViolation...: a deployment problem, not the caller's; 503 so
    # that the outbox keeps retrying until an operator fixes it.
    raise DirectoryUnavailable("The LDAP directory refused the operation", ldap_result=description)


def _stale(exc: ldap_exc.LDAPException) -> bool:
    """A pooled connection the server has dropped (worth one retry), as opposed to a server that is
    too slow: retrying a timeout would only double the wait."""
    return isinstance(exc, _CONNECTION_ERRORS) and not isinstance(exc.__context__, TimeoutError)


def _translate(exc: ldap_exc.LDAPException) -> AutoenrollError:
    if isinstance(exc, _CONNECTION_ERRORS):
        return DirectoryUnavailable(ldap_error=type(exc).__name__)
    if isinstance(exc, ldap_exc.LDAPBindError):
        return DirectoryUnavailable("The LDAP directory refused the service account's bind")
    return AutoenrollError("LDAP client error", ldap_error=type(exc).__name__)  # a bug of ours


# --- python-ldap ---------------------------------------------------------------------------------
def _fast_search(conn, base: str, flt: str, attributes: list[str], settings: LdapSettings) -> list[dict]:
    """Up to two entries (enough to know an address is ambiguous), shaped like ldap3's `_entries`."""
    try:
        found = conn.search_ext_s(base, _pyldap.SCOPE_SUBTREE, flt, attributes, sizelimit=2,
                                  timeout=settings.timeout_seconds)
    except _pyldap.SIZELIMIT_EXCEEDED:
        raise AmbiguousUser() from None  # more than two entries
    return [{"dn": dn, "raw_attributes": attrs} for dn, attrs in found if dn is not None]


def _fast_publish(conn, dn: str, wanted: Wanted, settings: LdapSettings, *, seen: UserEntry | None = None) -> None:
    """LdapDirectory.publish on a python-ldap connection: plan, then one modify asserting the entryCSN.

    `seen` (the entry as this request read it, with its entryCSN) spares the first read (but not the
    conclusion that nothing is to be done, which only a fresh read can tell). A modify
    refused because the entry changed (assertion failed, or a value to delete is gone or one to add is
    there) is planned again on a fresh read. A server that does not take the assertion control gets
    the same modify without it: deleting by value still refuses to apply over a concurrent removal.
    """
    asserting, fresh = True, seen is None
    current, version = (list(seen.certificates), seen.version) if seen is not None else (None, None)
    for _ in range(4):
        if current is None:
            fresh = True
            found = conn.search_ext_s(dn, _pyldap.SCOPE_BASE, "(objectClass=*)", [CERT_ATTR, VERSION_ATTR],
                                      timeout=settings.timeout_seconds)
            attrs = {"raw_attributes": found[0][1]} if found else {}
            current = _values(attrs, CERT_ATTR)
            version = b"".join(_values(attrs, VERSION_ATTR)[:1]).decode("ascii", "replace")
        plan = plan_values(current, wanted)
        if not plan.changes:
            if fresh:
                return
            current = None  # nothing to do on the entry as the request read it: make sure it still is so
            continue
        controls = [_AssertionControl(True, f"({VERSION_ATTR}={filter_value(version)})")] \
            if asserting and version else None
        try:
            conn.modify_ext_s(dn, modify_operations(plan), serverctrls=controls)
            return
        except _pyldap.UNAVAILABLE_CRITICAL_EXTENSION:
            asserting = False  # no assertions on this server: plan again, modify without
        except (_pyldap.ASSERTION_FAILED, _pyldap.TYPE_OR_VALUE_EXISTS, _pyldap.NO_SUCH_ATTRIBUTE):
            pass  # another writer changed the entry since it was read
        current = None
    raise DirectoryUnavailable("The directory entry keeps changing; try again later")


def modify_operations(plan: Plan) -> list[tuple]:
    """python-ldap's modlist for one plan: the deletes, then the adds in order, in one modify."""
    return ([(_pyldap.MOD_DELETE, CERT_ATTR, list(plan.deletes))] if plan.deletes else []) + \
           ([(_pyldap.MOD_ADD, CERT_ATTR, list(plan.adds))] if plan.adds else [])


def _fast_result_code(exc) -> int | None:
    """The LDAP result code the server sent, or None for a client-side failure (no answer)."""
    code = getattr(exc, "errnum", None)
    return code if isinstance(code, int) and code >= 0 else None


def bound_pyldap_connection(s: LdapSettings):
    """A python-ldap connection bound as the service account; its errors are the caller's to translate."""
    conn = _pyldap.initialize(s.url)
    conn.set_option(_pyldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(_pyldap.OPT_REFERRALS, 0)
    conn.set_option(_pyldap.OPT_NETWORK_TIMEOUT, s.timeout_seconds)
    conn.timeout = s.timeout_seconds  # every synchronous (_s) operation waits at most this long
    conn.simple_bind_s(s.bind_dn, s.password)
    return conn


def translate_pyldap_error(exc) -> AutoenrollError:
    """python-ldap's twin of `_translate` + `_check`: the same errors for the same situations."""
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    description = info.get("desc", type(exc).__name__)
    if isinstance(exc, _pyldap.INVALID_CREDENTIALS):
        return DirectoryUnavailable("The LDAP directory refused the service account's bind")
    code = _fast_result_code(exc)
    if code is None:
        if isinstance(exc, (_pyldap.SERVER_DOWN, _pyldap.TIMEOUT, _pyldap.CONNECT_ERROR)):
            return DirectoryUnavailable(ldap_error=type(exc).__name__)
        return AutoenrollError("LDAP client error", ldap_error=type(exc).__name__)  # a bug of ours
    if code == NO_SUCH_OBJECT:
        return UserNotFound("The directory entry does not exist")
    if code in _TRANSIENT:
        return DirectoryUnavailable(ldap_result=description)
    return DirectoryUnavailable("The LDAP directory refused the operation", ldap_result=description)


def _close_fast(conn) -> None:
    try:
        conn.unbind_ext_s()
    except Exception:  # the peer may be gone; we only want the socket closed
        pass


def _entries(conn: Connection) -> list[dict]:
    return [r for r in conn.response or [] if r.get("type") == "searchResEntry"]


def _values(entry: dict, name: str) -> list[bytes]:
    raw = entry.get("raw_attributes", {})
    for key, values in raw.items():
        if key.lower() == name.lower():
            return list(values)
    return []


def _cookie(conn: Connection) -> bytes | None:
    control = conn.result.get("controls", {}).get(PAGED_RESULTS_OID, {})
    return control.get("value", {}).get("cookie") or None


def _first_rdn_value(dn: str) -> str:
    value = parse_dn(dn)[0][1]
    return re.sub(r"\\(.)", r"\1", value)


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # the peer may be gone; we only want the socket closed
        pass
    # After a failed send ldap3 may consider itself closed and leave the socket open: close it anyway.
    if conn.socket is not None:
        conn.socket.close()
