"""Bulk LDAP for reconcile and provisioning: fast paged scans and one-modify publication.

ldap3 decodes BER in pure Python: a paged scan of users with mail, memberOf and certificates reads
about 12,000 entries/s here, python-ldap (libldap) about 56,000/s, and a python-ldap modify costs
0.04 ms of client CPU instead of 0.26 ms. So the passes over whole directories use python-ldap when
it is installed and fall back to LdapDirectory (ldap3) otherwise: slower, same effect.

Publication of many entries (`publish_many`) is pipelined: modifies are sent without waiting for the
previous answer (up to WINDOW in flight), so slapd applies one while we send the next; one modify at a
time waited a round trip each, and on a busy 2-core machine that wait, not CPU, set the pace.

Errors: python-ldap exceptions go through `ldap.translate_pyldap_error`, the one adapter shared with
ldap.py; nothing outside these modules sees a python-ldap exception.

Entries come back as (dn, {lower-case attribute name: [bytes, ...]}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from directory_sync.ldap import (CERT_ATTR, LdapDirectory, _fast_result_code, bound_pyldap_connection,
                                  plan_publication, translate_pyldap_error)
from registration_app.core.errors import AutoenrollError, UserNotFound

try:  # python-ldap: C bindings to libldap (Debian libldap2-dev + libsasl2-dev to build it)
    import ldap as _pyldap
    from ldap.controls import SimplePagedResultsControl
except ImportError:  # pragma: no cover - exercised only where python-ldap cannot be built
    _pyldap = None

PAGE_SIZE = 1000
WINDOW = 100  # modifies in flight on one connection
_UNANSWERED = object()
Entry = tuple[str, dict[str, list[bytes]]]
Change = tuple[str, list[bytes], list[bytes], list[bytes]]  # (dn, current, add, remove) as for publish()


class BulkDirectory:
    """One connection (not shared between threads: give each thread its own BulkDirectory)."""

    def __init__(self, directory: LdapDirectory) -> None:
        self.directory = directory
        self.settings = directory.settings
        self._conn = None

    @property
    def fast(self) -> bool:
        return _pyldap is not None

    # --- reading ---------------------------------------------------------------------------------
    def scan(self, base: str, flt: str, attributes: list[str]) -> Iterator[Entry]:
        """Paged subtree search: every entry under `base` matching `flt` (a filter built with
        escape.filter_value for any input)."""
        if not self.fast:
            for entry in self.directory._paged(base, flt, attributes):
                yield entry["dn"], {k.lower(): list(v) for k, v in entry.get("raw_attributes", {}).items()}
            return
        conn = self._connection()
        control = SimplePagedResultsControl(True, size=PAGE_SIZE, cookie=b"")
        try:
            while True:
                msgid = conn.search_ext(base, _pyldap.SCOPE_SUBTREE, flt, attributes, serverctrls=[control])
                _, data, _, controls = conn.result3(msgid, timeout=max(30.0, self.settings.timeout_seconds))
                for dn, attrs in data:
                    if dn is not None:  # referrals come back without a DN
                        yield dn, {k.lower(): v for k, v in attrs.items()}
                cookie = next((c.cookie for c in controls
                               if c.controlType == SimplePagedResultsControl.controlType), b"")
                if not cookie:
                    return
                control.cookie = cookie
        except _pyldap.NO_SUCH_OBJECT:
            return
        except _pyldap.LDAPError as exc:
            self._drop()
            raise translate_pyldap_error(exc) from exc

    def read(self, dn: str, attributes: list[str]) -> dict[str, list[bytes]] | None:
        """One entry's attributes, or None if there is no such entry."""
        if not self.fast:
            def work(conn):
                from ldap3 import BASE
                from directory_sync.ldap import NO_SUCH_OBJECT, _check, _entries
                conn.search(dn, "(objectClass=*)", BASE, attributes=attributes)
                if _check(conn, NO_SUCH_OBJECT) == NO_SUCH_OBJECT:
                    return None
                entries = _entries(conn)
                return {k.lower(): list(v) for k, v in entries[0].get("raw_attributes", {}).items()} \
                    if entries else None
            return self.directory._run(work)
        conn = self._connection()
        try:
            result = conn.search_ext_s(dn, _pyldap.SCOPE_BASE, "(objectClass=*)", attributes,
                                       timeout=self.settings.timeout_seconds)
        except _pyldap.NO_SUCH_OBJECT:
            return None
        except _pyldap.LDAPError as exc:
            self._drop()
            raise translate_pyldap_error(exc) from exc
        return {k.lower(): v for k, v in result[0][1].items()} if result else None

    # --- writing ---------------------------------------------------------------------------------
    def publish(self, dn: str, current: list[bytes], add: list[bytes], remove: list[bytes]) -> bool:
        """Bring `dn`'s userCertificate;binary from `current` (as just read) to what `add`/`remove`
        ask, in one modify, values of other issuers untouched. True if a modify was sent.

        If the entry changed since it was read (the modify fails as a whole on a value that exists or
        is missing), LdapDirectory.publish reads it again and retries.
        """
        deletes, adds = plan_publication(current, add, remove)
        if not deletes and not adds:
            return False
        if not self.fast:
            self.directory.publish(dn, add, remove)
            return True
        conn = self._connection()
        try:
            conn.modify_ext_s(dn, _operations(deletes, adds))
        except (_pyldap.TYPE_OR_VALUE_EXISTS, _pyldap.NO_SUCH_ATTRIBUTE):
            self.directory.publish(dn, add, remove)  # someone else wrote meanwhile: read again
        except _pyldap.NO_SUCH_OBJECT as exc:
            raise UserNotFound("The directory entry does not exist") from exc
        except _pyldap.LDAPError as exc:
            self._drop()
            raise translate_pyldap_error(exc) from exc
        return True

    def publish_many(self, changes: Sequence[Change], window: int = WINDOW) -> list[AutoenrollError | None]:
        """`publish` for many entries, pipelined (see the module's docstring). One outcome per change,
        in order: None (published, or nothing to do) or the error that left that entry as it was.

        A refused modify (the entry changed meanwhile, or is gone) costs only that entry; a lost
        connection fails every change not yet answered, and the next call opens a new one.
        """
        if not self.fast:
            return [_outcome(self.publish, *change) for change in changes]
        outcomes: list = [_UNANSWERED] * len(changes)
        in_flight: deque[tuple[int, int]] = deque()  # (index in changes, message id), in sending order
        try:
            conn = self._connection()
            for index, (dn, current, add, remove) in enumerate(changes):
                deletes, adds = plan_publication(current, add, remove)
                if not deletes and not adds:
                    outcomes[index] = None
                    continue
                in_flight.append((index, conn.modify_ext(dn, _operations(deletes, adds))))
                if len(in_flight) >= window:
                    self._answer(conn, in_flight.popleft(), changes, outcomes)
            while in_flight:
                self._answer(conn, in_flight.popleft(), changes, outcomes)
        except (_pyldap.LDAPError, AutoenrollError) as exc:  # no connection, or it broke: unanswered = undone
            self._drop()
            error = exc if isinstance(exc, AutoenrollError) else translate_pyldap_error(exc)
            outcomes = [error if o is _UNANSWERED else o for o in outcomes]
        return outcomes

    def _answer(self, conn, sent: tuple[int, int], changes: Sequence[Change], outcomes: list) -> None:
        """Wait for one pipelined modify and record its outcome; python-ldap's exception passes
        through when the connection itself failed (no answer)."""
        index, msgid = sent
        dn, _, add, remove = changes[index]
        try:
            conn.result3(msgid, timeout=self.settings.timeout_seconds)
            outcomes[index] = None
        except (_pyldap.TYPE_OR_VALUE_EXISTS, _pyldap.NO_SUCH_ATTRIBUTE):
            outcomes[index] = _outcome(self.directory.publish, dn, add, remove)  # changed meanwhile: read again
        except _pyldap.LDAPError as exc:
            if _fast_result_code(exc) is None:  # no answer from the server
                raise
            outcomes[index] = translate_pyldap_error(exc)  # this modify was refused; the connection is fine

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> BulkDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the connection --------------------------------------------------------------------------
    def _connection(self):
        if self._conn is not None:
            return self._conn
        try:
            conn = bound_pyldap_connection(self.settings)
        except _pyldap.LDAPError as exc:
            raise translate_pyldap_error(exc) from exc
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.unbind_s()
            except Exception:  # the peer may be gone; we only want the socket closed
                pass


def values(attrs: dict[str, list[bytes]], name: str) -> list[bytes]:
    """The values of `name` (any case; `userCertificate;binary` also matches as returned)."""
    return attrs.get(name.lower(), [])


def _operations(deletes: list[bytes], adds: list[bytes]) -> list[tuple]:
    """python-ldap's modlist for one publication: the deletes, then the adds, in one modify."""
    return ([(_pyldap.MOD_DELETE, CERT_ATTR, deletes)] if deletes else []) + \
           ([(_pyldap.MOD_ADD, CERT_ATTR, adds)] if adds else [])


def _outcome(publish, *change) -> AutoenrollError | None:
    try:
        publish(*change)
    except AutoenrollError as exc:
        return exc
    return None
