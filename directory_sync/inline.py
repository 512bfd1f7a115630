"""The request path's publications as a group commit: the users of requests that publish at the same
time in one process go in one LDAP transaction (RFC 5805, ldap_txn.py), which slapd commits (and
fsyncs) once for all of them.

A request whose process has no publication in flight publishes its own user at once, in its own thread,
as the request path always did (`Publisher.sync_user`): it leads. Requests that come while it is in the
directory queue; when the leader is done, the first of them leads the next round with every user queued
meanwhile (at most WINDOW, each once): several in one transaction, each modify asserting (RFC 4528) the
entryCSN its request read. If the server refuses the transaction (an entry changed meanwhile, a class
missing), nothing was applied and each user is published on its own, with every rule of `sync_user`
(read again, pkiUser added, schema refusals). After a commit the users' rows are read again in one
query, and anyone whose records changed meanwhile is published again (`sync_user`), as after any
inline modify. (One thread per process doing every publication was measured first: it formed few
batches and made requests wait longer for it than they had waited publishing themselves; PERFORMANCE.md.)

A queued request waits at most `wait` seconds (Settings `publish_timeout_seconds`): then it leaves the
queue, its rows are handed to the outbox worker at once, and its answer says the truth, "not in the
directory yet". Nothing is lost either way: the outbox row was committed with the certificate.

A directory that does not offer transactions (Samba, AD) is not routed here: each request publishes
inline, in parallel, as before. Nor is any directory by default (`[ldap] inline_transactions = false`):
slapd 2.5 can crash when a transaction's end follows its updates' answers closely (ldap_txn.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import ldap
from ldap.controls.libldap import AssertionControl

from directory_sync import connection, ldap_txn
from directory_sync.escape import filter_value
from directory_sync.plan import plan_values, wanted_values
from registration_app.core.errors import AutoenrollError, DirectoryUnavailable
from registration_app.core.model import UserEntry
from registration_app.store import outbox

if TYPE_CHECKING:
    from directory_sync.ldap import LdapDirectory
    from directory_sync.publisher import Publisher

log = logging.getLogger("autoenroll.publisher")

WINDOW = 64  # users in one transaction at most (a process has a handful of request threads)


@dataclass(eq=False)
class Request:
    """One request's user, as its issuance read it. `woken` is set when it is finished (published or
    handed to the worker) or when it is its turn to lead."""

    user_dn: str
    rows: list
    certs: list
    entry: UserEntry | None
    woken: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    published: bool = False
    leads: bool = False


class InlinePublications:
    """The group commit of one process's request-path publications (see the module's docstring)."""

    def __init__(self, publisher: Publisher, directory: LdapDirectory) -> None:
        self.publisher = publisher
        self.directory = directory
        self.settings = directory.settings
        self._lock = threading.Lock()
        self._queue: list[Request] = []  # not yet taken by a leader
        self._leading = False  # a request of this process is publishing now
        self._pid: int | None = None
        self._conn = None  # the leaders' connection for transactions (one leader at a time uses it)
        self._transactions: bool | None = None  # does the server offer them? (asked once per connection)
        self.batches = 0  # transactions committed, and users published in them (tests and bench read them)
        self.batched_users = 0

    @property
    def available(self) -> bool:
        """False once the server said it has no transactions: then requests publish inline themselves."""
        return self._transactions is not False

    def publish(self, user_dn: str, *, rows: list, certs: list, entry: UserEntry | None, wait: float) -> bool:
        """Publish the user now, or with the next round; True if it is in the directory within `wait` s."""
        request = Request(user_dn, rows, certs, entry)
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid, self._queue, self._leading, self._conn = os.getpid(), [], False, None
            self._queue.append(request)
            request.leads = not self._leading
            self._leading = True
        deadline = time.monotonic() + wait
        while not request.leads:
            request.woken.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                if request.finished:
                    return request.published
                if request.leads:
                    break
                if time.monotonic() < deadline:
                    continue
                if request not in self._queue:  # in the round being published: its leader finishes it
                    return False
                self._queue.remove(request)  # waited long enough: the worker publishes it
            log.info("event=publish.answered_before dn=%r wait=%.1f", user_dn, wait)
            self._deferred(request, DirectoryUnavailable("the directory did not answer in time"))
            return False
        self._lead(request)
        return request.published

    def _lead(self, me: Request) -> None:
        """Publish rounds of the queue until `me` is finished, then hand the lead to the next in line."""
        while not me.finished:
            with self._lock:
                batch, seen, left = [], set(), []
                for request in self._queue:  # each user once per round: a second waits its turn
                    key = request.user_dn.lower()
                    if key in seen or len(batch) >= WINDOW:
                        left.append(request)
                    else:
                        seen.add(key)
                        batch.append(request)
                self._queue = left
            try:
                self.publish_batch(batch)
            except Exception:  # a bug: the rows go to the worker rather than wait for their grace
                log.exception("event=publish.inline_error users=%d", len(batch))
                for request in batch:
                    if not request.published:
                        self._deferred(request, DirectoryUnavailable("the inline publication failed"))
            finally:
                with self._lock:
                    for request in batch:
                        request.finished = True
                        request.woken.set()
                    if me.finished:
                        if self._queue:
                            self._queue[0].leads = True
                            self._queue[0].woken.set()
                        else:
                            self._leading = False

    def publish_batch(self, batch: list[Request]) -> None:
        """One round: several users in one transaction, else each alone."""
        now = datetime.now(timezone.utc)
        together = [r for r in batch if r.entry is not None and r.entry.dn == r.user_dn and r.entry.version]
        alone = [r for r in batch if r not in together]
        if len(together) > 1:
            alone += self._in_one_transaction(together, now)
        else:
            alone += together
        down = False
        for request in alone:
            if down:  # the directory did not answer the one before: do not wait for it once per user
                self._deferred(request, DirectoryUnavailable("the directory did not answer"))
                continue
            down = not self._alone(request, now)

    def _alone(self, request: Request, now: datetime) -> bool:
        """`sync_user` as the request path always did; False if the directory did not answer."""
        try:
            self.publisher.sync_user(request.user_dn, now=now, certs=request.certs, entry=request.entry)
        except AutoenrollError as exc:
            self._deferred(request, exc)
            return not (isinstance(exc, DirectoryUnavailable) and exc.extra.get("ldap_error"))  # no answer
        self._published(request)
        return True

    def _in_one_transaction(self, batch: list[Request], now: datetime) -> list[Request]:
        """The batch's modifies in one transaction; returns the requests left to publish one by one."""
        names = self.directory.attributes
        updates, planned, left = [], [], []
        for request in batch:
            assert request.entry is not None
            wanted = wanted_values(request.certs, self.publisher.profiles, now)
            plan = plan_values(list(request.entry.certificates), wanted)
            if not plan.changes:  # only a fresh read can tell nothing is to be done: sync_user reads
                left.append(request)
                continue
            assertion = AssertionControl(True, f"({names.version}={filter_value(request.entry.version)})")
            updates.append((request.user_dn, self.directory.modify_operations(plan), [assertion]))
            planned.append((request, wanted))
        if len(updates) < 2:
            return left + [request for request, _ in planned]
        try:
            conn = self._connection()
            if not self._offers_transactions(conn):
                return left + [request for request, _ in planned]
            committed = ldap_txn.modify_all(conn, updates, self.settings.timeout_seconds)
        except ldap.LDAPError as exc:  # no answer: this connection is done for; each alone, on the pool
            log.warning("event=publish.batch_failed users=%d error=%r", len(updates), connection.translate(exc).detail)
            self._drop()
            return left + [request for request, _ in planned]
        except AutoenrollError as exc:  # no connection could be opened
            log.warning("event=publish.batch_failed users=%d error=%r", len(updates), exc.detail)
            return left + [request for request, _ in planned]
        if not committed:  # nothing applied: someone changed an entry, or one needs pkiUser
            log.info("event=publish.batch_refused users=%d", len(updates))
            return left + [request for request, _ in planned]
        self.batches += 1
        self.batched_users += len(planned)
        log.info("event=publish.batch users=%d", len(planned))
        # As after any modify (Publisher.sync_user): a change committed since the rows were read is
        # published again, from the rows as they are now.
        try:
            newer = outbox.planned_rows_of_many(self.publisher.db, [r.user_dn for r, _ in planned])
        except AutoenrollError as exc:  # the database is down: the worker publishes and checks again
            for request, _ in planned:
                self._deferred(request, exc)
            return left
        for request, wanted in planned:
            if wanted_values(newer.get(request.user_dn, []), self.publisher.profiles, now).shown == wanted.shown:
                self._published(request)
            else:
                log.info("event=publish.again dn=%r why=records_changed", request.user_dn)
                request.certs, request.entry = newer.get(request.user_dn, []), None
                left.append(request)
        return left

    def _published(self, request: Request) -> None:
        self.publisher.completions.submit(request.user_dn, request.rows)
        request.published = True

    def _deferred(self, request: Request, exc: AutoenrollError) -> None:
        log.warning("event=publish.deferred dn=%r error=%r", request.user_dn, exc.detail)
        self.publisher.due_now([r.id for r in request.rows], exc)

    # -- its connection ------------------------------------------------------------------------
    def _connection(self):
        if self._conn is None:
            try:
                self._conn = connection.bind(self.settings, self.directory.pool.credentials)
            except ldap.LDAPError as exc:
                raise connection.translate(exc) from exc
        return self._conn

    def _offers_transactions(self, conn) -> bool:
        if self._transactions is None:
            self._transactions = ldap_txn.supported(conn)
            if not self._transactions:
                log.info("event=publish.no_transactions: each request publishes inline")
        return self._transactions

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            connection.close(conn)
