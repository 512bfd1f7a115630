"""Bulk LDAP for reconcile and provisioning: fast paged scans and one-modify-per-entry publication.

Publication of many entries (`publish_many`) goes WINDOW entries at a time in one LDAP transaction
(RFC 5805, see ldap_txn.py) when the server offers them: slapd then commits once per WINDOW entries,
which cut its CPU per entry by about 8. Without transactions (or when one is refused) the modifies
are pipelined: sent without waiting for the previous answer, so slapd applies one while we send the
next; one modify at a time waited a round trip each, and on a busy 2-core machine that wait, not CPU,
set the pace.

It holds one connection of its own (pipelining and transactions need it), opened with
`connection.bind`; python-ldap exceptions go through `connection.translate`, the one adapter; nothing
outside directory_sync sees one.

Entries come back as (dn, {lower-case attribute name: [bytes, ...]}) (see connection.values).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import ldap

from directory_sync import connection, ldap_txn
from directory_sync.connection import Attributes, Entry
from directory_sync.ldap import LdapDirectory
from directory_sync.plan import Wanted, plan_values
from registration_app.core.errors import AutoenrollError, UserNotFound

PAGE_SIZE = 1000
WINDOW = 100  # modifies in one transaction, or in flight on one connection
_UNANSWERED = object()
Change = tuple[str, list[bytes], Wanted]  # (dn, values as read, what our records want) as for publish()


class BulkDirectory:
    """One connection (not shared between threads: give each thread its own BulkDirectory).
    `transactions=False` publishes without LDAP transactions even where the server offers them; by
    default the settings' `bulk_transactions` decides."""

    def __init__(self, directory: LdapDirectory, *, transactions: bool | None = None) -> None:
        self.directory = directory
        self.settings = directory.settings
        self.transactions = self.settings.bulk_transactions if transactions is None else transactions
        self._conn = None
        self._txn: bool | None = None  # does the server offer transactions? (asked once per connection)

    # --- reading ---------------------------------------------------------------------------------
    def scan(self, base: str, flt: str, attributes: list[str]) -> Iterator[Entry]:
        """Paged subtree search: every entry under `base` matching `flt` (a filter built with
        escape.filter_value for any input)."""
        conn = self._connection()
        try:
            for page in connection.search_pages(conn, base, flt, attributes, page_size=PAGE_SIZE,
                                                timeout=max(30.0, self.settings.timeout_seconds)):
                yield from page
        except ldap.LDAPError as exc:
            self._drop()
            raise connection.translate(exc) from exc

    def read(self, dn: str, attributes: list[str]) -> Attributes | None:
        """One entry's attributes, or None if there is no such entry."""
        conn = self._connection()
        try:
            return connection.read(conn, dn, attributes, self.settings.timeout_seconds)
        except ldap.LDAPError as exc:
            self._drop()
            raise connection.translate(exc) from exc

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
        conn = self._connection()
        try:
            conn.modify_ext_s(dn, self.directory.modify_operations(plan))
        except (ldap.TYPE_OR_VALUE_EXISTS, ldap.NO_SUCH_ATTRIBUTE):
            self.directory.publish(dn, wanted)  # someone else wrote meanwhile: read again
        except ldap.NO_SUCH_OBJECT as exc:
            raise UserNotFound("The directory entry does not exist") from exc
        except ldap.LDAPError as exc:
            self._drop()
            raise connection.translate(exc) from exc
        return True

    def publish_many(self, changes: Sequence[Change], window: int = WINDOW) -> list[AutoenrollError | None]:
        """`publish` for many entries, `window` at a time: in one LDAP transaction when the server
        offers them (see ldap_txn.py), else pipelined (see the module's docstring). One outcome per
        change, in order: None (published, or nothing to do) or the error that left that entry as it was.

        A refused modify (the entry changed meanwhile, or is gone) costs only that entry; a lost
        connection fails every change not yet answered, and the next call opens a new one.
        """
        outcomes: list = [_UNANSWERED] * len(changes)
        planned = []  # (index in changes, modlist)
        for index, (dn, current, wanted) in enumerate(changes):
            plan = plan_values(current, wanted)
            if plan.changes:
                planned.append((index, self.directory.modify_operations(plan)))
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
        except (ldap.LDAPError, AutoenrollError) as exc:  # no connection, or it broke: unanswered = undone
            self._drop()
            error = exc if isinstance(exc, AutoenrollError) else connection.translate(exc)
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
        return ldap_txn.modify_all(conn, [(changes[index][0], ops, []) for index, ops in chunk],
                                   self.settings.timeout_seconds)

    def _pipelined(self, conn, chunk: list[tuple[int, list]], changes: Sequence[Change], outcomes: list) -> None:
        """The chunk's modifies sent without waiting for each answer; records each outcome."""
        sent = [(index, conn.modify_ext(changes[index][0], ops)) for index, ops in chunk]
        for index, msgid in sent:
            dn, _, wanted = changes[index]
            try:
                conn.result3(msgid, timeout=self.settings.timeout_seconds)
                outcomes[index] = None
            except (ldap.TYPE_OR_VALUE_EXISTS, ldap.NO_SUCH_ATTRIBUTE):
                outcomes[index] = _outcome(self.directory.publish, dn, wanted)  # changed meanwhile: read again
            except ldap.LDAPError as exc:
                if connection.result_code(exc) is None:  # no answer from the server
                    raise
                outcomes[index] = connection.translate(exc)  # this modify was refused; the connection is fine

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
            conn = connection.bind(self.settings, self.directory.pool.credentials)
        except ldap.LDAPError as exc:
            raise connection.translate(exc) from exc
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn, self._txn = self._conn, None, None
        if conn is not None:
            connection.close(conn)


def _outcome(publish, *change) -> AutoenrollError | None:
    try:
        publish(*change)
    except AutoenrollError as exc:
        return exc
    return None
