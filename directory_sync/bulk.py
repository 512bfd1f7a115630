"""Bulk LDAP for reconcile and provisioning: fast paged scans and one-modify-per-entry publication.

ldap3 decodes BER in pure Python: a paged scan of users with mail, memberOf and certificates reads
about 12,000 entries/s here, python-ldap (libldap) about 56,000/s, and a python-ldap modify costs
0.04 ms of client CPU instead of 0.26 ms. So the passes over whole directories use python-ldap when
it is installed and fall back to LdapDirectory (ldap3) otherwise: slower, same effect.

Publication of many entries (`publish_many`) goes WINDOW entries at a time in one LDAP transaction
(RFC 5805, see ldap_txn.py) when the server offers them: slapd then commits once per WINDOW entries,
which cut its CPU per entry by about 8. Without transactions (or when one is refused) the modifies
are pipelined: sent without waiting for the previous answer, so slapd applies one while we send the
next; one modify at a time waited a round trip each, and on a busy 2-core machine that wait, not CPU,
set the pace.

Errors: python-ldap exceptions go through `ldap.translate_pyldap_error`, the one adapter shared with
ldap.py; nothing outside these modules sees a python-ldap exception.

Entries come back as (dn, {lower-case attribute name: [bytes, ...]}).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from directory_sync.ldap import (LdapDirectory, _fast_result_code, bound_pyldap_connection,
                                  modify_operations, translate_pyldap_error)
from directory_sync.plan import Wanted, plan_values
from registration_app.core.errors import AutoenrollError, UserNotFound

try:  # python-ldap: C bindings to libldap (Debian libldap2-dev + libsasl2-dev to build it)
    import ldap as _pyldap
    from ldap.controls import SimplePagedResultsControl

    from directory_sync import ldap_txn
except ImportError:  # pragma: no cover - exercised only where python-ldap cannot be built
    _pyldap = None

PAGE_SIZE = 1000
WINDOW = 100  # modifies in one transaction, or in flight on one connection
_UNANSWERED = object()
Entry = tuple[str, dict[str, list[bytes]]]
Change = tuple[str, list[bytes], Wanted]  # (dn, values as read, what our records want) as for publish()


class BulkDirectory:
    """One connection (not shared between threads: give each thread its own BulkDirectory).
    `transactions=False` publishes without LDAP transactions even where the server offers them."""

    def __init__(self, directory: LdapDirectory, *, transactions: bool = True) -> None:
        self.directory = directory
        self.settings = directory.settings
        self.transactions = transactions
        self._conn = None
        self._txn: bool | None = None  # does the server offer transactions? (asked once per connection)

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
    def publish(self, dn: str, current: list[bytes], wanted: Wanted) -> bool:
        """Bring `dn`'s userCertificate;binary from `current` (as just read) to what `wanted` asks
        (plan.plan_values), in one modify. True if a modify was sent.

        The scan read no entryCSN, so this modify carries no assertion; deleting by value makes it
        fail as a whole if a value it moves or removes changed meanwhile, and then
        LdapDirectory.publish reads the entry again and publishes with the assertion.
        """
        plan = plan_values(current, wanted)
        if not plan.changes:
            return False
        if not self.fast:
            self.directory.publish(dn, wanted)
            return True
        conn = self._connection()
        try:
            conn.modify_ext_s(dn, modify_operations(plan))
        except (_pyldap.TYPE_OR_VALUE_EXISTS, _pyldap.NO_SUCH_ATTRIBUTE):
            self.directory.publish(dn, wanted)  # someone else wrote meanwhile: read again
        except _pyldap.NO_SUCH_OBJECT as exc:
            raise UserNotFound("The directory entry does not exist") from exc
        except _pyldap.LDAPError as exc:
            self._drop()
            raise translate_pyldap_error(exc) from exc
        return True

    def publish_many(self, changes: Sequence[Change], window: int = WINDOW) -> list[AutoenrollError | None]:
        """`publish` for many entries, `window` at a time: in one LDAP transaction when the server
        offers them (see ldap_txn.py), else pipelined (see the module's docstring). One outcome per
        change, in order: None (published, or nothing to do) or the error that left that entry as it was.

        A refused modify (the entry changed meanwhile, or is gone) costs only that entry; a lost
        connection fails every change not yet answered, and the next call opens a new one.
        """
        if not self.fast:
            return [_outcome(self.publish, *change) for change in changes]
        outcomes: list = [_UNANSWERED] * len(changes)
        planned = []  # (index in changes, modlist)
        for index, (dn, current, wanted) in enumerate(changes):
            plan = plan_values(current, wanted)
            if plan.changes:
                planned.append((index, modify_operations(plan)))
            else:
                outcomes[index] = None
        try:
            conn = self._connection()
            for start in range(0, len(planned), window):
                chunk = planned[start:start + window]
                if self._transactions(conn) and self._in_transaction(conn, chunk, changes):
                    for index, _ in chunk:
                        outcomes[index] = None
                else:
                    self._pipelined(conn, chunk, changes, outcomes)
        except (_pyldap.LDAPError, AutoenrollError) as exc:  # no connection, or it broke: unanswered = undone
            self._drop()
            error = exc if isinstance(exc, AutoenrollError) else translate_pyldap_error(exc)
            outcomes = [error if o is _UNANSWERED else o for o in outcomes]
        return outcomes

    def _transactions(self, conn) -> bool:
        if not self.transactions:
            return False
        if self._txn is None:
            self._txn = ldap_txn.supported(conn)
        return self._txn

    def _in_transaction(self, conn, chunk: list[tuple[int, list]], changes: Sequence[Change]) -> bool:
        """The chunk's modifies in one transaction: True once committed; False if the server refused
        it (then nothing was applied). python-ldap's exception passes through when no answer came."""
        try:
            identifier = ldap_txn.start(conn)
        except _pyldap.LDAPError as exc:
            if _fast_result_code(exc) is None:
                raise
            self._txn = False  # announced but refused: this connection does without
            return False
        spec = [ldap_txn.control(identifier)]
        sent = [conn.modify_ext(changes[index][0], ops, serverctrls=spec) for index, ops in chunk]
        refused = False
        for msgid in sent:  # each update is only queued here; a refusal now dooms the transaction
            try:
                conn.result3(msgid, timeout=self.settings.timeout_seconds)
            except _pyldap.LDAPError as exc:
                if _fast_result_code(exc) is None:
                    raise
                refused = True
        try:
            ldap_txn.end(conn, identifier, commit=not refused)
        except _pyldap.LDAPError as exc:
            if _fast_result_code(exc) is None:
                raise
            return False
        return not refused

    def _pipelined(self, conn, chunk: list[tuple[int, list]], changes: Sequence[Change], outcomes: list) -> None:
        """The chunk's modifies sent without waiting for each answer; records each outcome."""
        sent = [(index, conn.modify_ext(changes[index][0], ops)) for index, ops in chunk]
        for index, msgid in sent:
            dn, _, wanted = changes[index]
            try:
                conn.result3(msgid, timeout=self.settings.timeout_seconds)
                outcomes[index] = None
            except (_pyldap.TYPE_OR_VALUE_EXISTS, _pyldap.NO_SUCH_ATTRIBUTE):
                outcomes[index] = _outcome(self.directory.publish, dn, wanted)  # changed meanwhile: read again
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
        conn, self._conn, self._txn = self._conn, None, None
        if conn is not None:
            try:
                conn.unbind_s()
            except Exception:  # the peer may be gone; we only want the socket closed
                pass


def values(attrs: dict[str, list[bytes]], name: str) -> list[bytes]:
    """The values of `name` (any case; `userCertificate;binary` also matches as returned)."""
    return attrs.get(name.lower(), [])



def _outcome(publish, *change) -> AutoenrollError | None:
    try:
        publish(*change)
    except AutoenrollError as exc:
        return exc
    return None
