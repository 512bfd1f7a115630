"""Publication through the outbox: the database says what the directory must show; this makes it so.

An outbox row names a user whose entry must be brought in line with our records. Syncing a user
computes the whole desired state of this CA's values from the database (current certificates first,
encryption before signature) and applies it in one idempotent modify, so rows can be retried,
reordered or processed twice without harm, and nothing is dropped while LDAP is down: a failed row
stays queued with exponential back-off and jitter.

A user whose entry no longer exists (noSuchObject) is not retried forever: the rows are marked done
with last_error 'user gone' and an audit row `publish.user_gone`. Nor is one whose entry the directory's
schema refuses the certificate for good (SchemaRefused: its classes do not allow it even with pkiUser
added in the same modify, or the value is too large): the rows end in the `schema_refused` state
(done, last_error 'schema_refused: <the directory's message>', shown by `autoenroll sync status`) with
an audit row `publish.schema_refused`; once the entry is fixed, reconcile publishes it. Their certificates are not
revoked here, because a missing entry can also be a rename: reconcile decides (a user found again by
mail under another DN is followed; one found nowhere is revoked with affiliationChanged).

The worker thread also keeps the CRL fresh when it was given the CA (`ca=`): at most once a minute it
asks the CA to rebuild the CRL if it is past half its validity, which queues its publication to the
CA entry like any revocation does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from directory_sync.inline import InlinePublications
from directory_sync.ldap import LdapDirectory
from directory_sync.plan import Wanted, wanted_values
from registration_app.core.errors import AutoenrollError, DirectoryUnavailable, SchemaRefused, UserNotFound
from registration_app.core.model import Profile, UserEntry
from registration_app.core.retry import backoff_delay
from registration_app.store import audit, outbox
from registration_app.store.db import Database
from registration_app.store.models import Outbox
from registration_app.store.outbox import mark_published
from registration_app.store.repos import certificates_of

log = logging.getLogger("autoenroll.publisher")

CLAIM = timedelta(seconds=60)
MAX_BACKOFF = 300.0
CRL_CHECK_SECONDS = 60.0
USER_GONE = "user gone"
SCHEMA_REFUSED = "schema_refused"  # last_error of rows refused for good: "schema_refused: <message>"
# Publications of one user in a row, each planned from a newer read of our records, before the rows are
# left to the worker (see Publisher.sync_user).
CONVERGE_ROUNDS = 5




class Completions:
    """Outbox rows published inline, marked done (with their directory.published audit rows) in
    transactions that commit anyway: the next enrollment's issuance transaction in this process takes
    the rows queued so far (`take`, then `settle`), so under load marking costs an UPDATE and an audit
    row in a commit already paid for, not a transaction and an fsync of its own. When no enrollment
    comes along within `LINGER` seconds, one thread per process marks them in a transaction of its own.

    Losing a batch (the process killed, the database unreachable) loses nothing: the rows stay
    queued, fall due after the grace the request path gave them, and the worker publishes them again,
    which changes nothing in the directory (publication is idempotent) and marks them then."""

    LINGER = 0.5

    def __init__(self, publisher: "Publisher") -> None:
        self.publisher = publisher
        self._cond = threading.Condition()
        self._items: list[tuple[str, list]] = []
        self._in_flight = 0  # batches taken by a transaction (or the thread) that has not ended yet
        self._flushing = 0
        self._idle = True  # the thread waits for rows (not lingering): a submit must wake it
        self._pid: int | None = None

    def submit(self, target: str, rows: list) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use in this process (or after a fork)
                self._pid, self._items, self._in_flight = os.getpid(), [], 0
                threading.Thread(target=self._run, name="outbox-completions", daemon=True).start()
            self._items.append((target, rows))
            if self._idle:  # lingering, the thread needs no wake-up: each one cost a context switch
                self._cond.notify_all()

    def take(self) -> list[tuple[str, list]]:
        """The queued rows, for a transaction about to commit: it marks them with store.repos.mark_published
        and then calls `settle(batch, requeue=...)`."""
        with self._cond:
            if self._pid != os.getpid() or not self._items:
                return []
            batch, self._items = self._items, []
            self._in_flight += 1
            return batch

    @contextmanager
    def carried(self) -> Iterator[list[tuple[str, list]]]:
        """`take`, then `settle`: the batch for a transaction run inside the block, queued again if
        the block raises (the transaction rolled back, or never ran)."""
        batch = self.take()
        try:
            yield batch
        except BaseException:
            self.settle(batch, requeue=True)
            raise
        self.settle(batch, requeue=False)

    def settle(self, batch: list[tuple[str, list]], *, requeue: bool) -> None:
        """The transaction that took `batch` ended; `requeue` when it rolled back (another will mark them)."""
        if not batch:
            return
        with self._cond:
            self._in_flight -= 1
            if requeue:
                self._items[:0] = batch
            if self._flushing or (requeue and self._idle):  # who waits for it: a flush, or the idle thread
                self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted row is marked (or failed to be); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1  # no lingering while someone waits
            self._cond.notify_all()
            try:
                while self._items or self._in_flight:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._pid != os.getpid():
                        return not (self._items or self._in_flight)
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle = True
                while not self._items:
                    self._cond.wait()
                self._idle = False
                linger_until = time.monotonic() + self.LINGER
                while self._items and not self._flushing and (left := linger_until - time.monotonic()) > 0:
                    self._cond.wait(left)
            batch = self.take()  # whatever no enrollment has taken meanwhile
            if not batch:
                continue
            try:
                self.publisher.db.run(lambda conn: audit.append_many(
                    conn, mark_published(conn, batch), datetime.now(timezone.utc)), core=True)
            except Exception:  # not queued again: the rows fall due for the worker by themselves
                log.exception("event=publish.mark_failed rows=%d", sum(len(rows) for _t, rows in batch))
            finally:
                self.settle(batch, requeue=False)


class Publisher:
    def __init__(self, db: Database, directory, profiles: dict[str, Profile], ca_certificate_der: bytes,
                 ca=None, *, inline_wait: float = 2.0):
        self.db = db
        self.directory = directory
        self.profiles = profiles
        self.ca_der = ca_certificate_der
        self.ca = ca  # a LocalCA: lets the worker rebuild the CRL before nextUpdate
        self._crl_checked = float("-inf")
        self.completions = Completions(self)
        # The request path's publications as a group commit (inline.py) on an LdapDirectory that asks
        # for it; a request queued behind another's publication waits at most inline_wait seconds.
        self.inline = InlinePublications(self, directory) \
            if isinstance(directory, LdapDirectory) and directory.settings.inline_transactions else None
        self.inline_wait = inline_wait
        self.targets: list = []  # directory_sync/targets.py TargetPublisher: [targets.NAME], each on its own

    def drain_targets(self) -> int:
        """One pass over every extra publication target; one that fails does not stop the others."""
        done = 0
        for target in self.targets:
            try:
                done += target.drain()
            except Exception:  # its rows stay due there; the next pass tries again
                log.exception("event=publish.target_error target=%r", target.name)
        return done

    # -- one user --------------------------------------------------------------------------
    def sync_user(self, user_dn: str, now: datetime | None = None, *, certs: list | None = None,
                  entry: UserEntry | None = None) -> None:
        """Bring the user's entry in line with our records (`certs`: the user's rows, if just read;
        `entry`: the directory entry, if just read, which spares the directory a read).

        A publication planned from rows read before a concurrent change (a revocation committed after
        an enrollment read the user's rows) would put the older truth back over the newer
        publication. So after the modify the rows are read again: if what they want differs from
        what was just published, the user is published again from the newer rows. Any change that
        commits after that read queues its own publication, which runs after this modify; so
        whichever publication writes last has checked the database after writing, and the directory
        ends with the database's truth without waiting for the worker or reconcile.
        """
        now = now or datetime.now(timezone.utc)
        if certs is None:
            certs = self._certificates_of(user_dn)
        wanted = wanted_values(certs, self.profiles, now)
        target = entry if entry is not None and entry.dn == user_dn else user_dn
        for _ in range(CONVERGE_ROUNDS):
            self.directory.publish(target, wanted)
            newer = wanted_values(self._certificates_of(user_dn), self.profiles, now)
            if newer.shown == wanted.shown:
                return
            log.info("event=publish.again dn=%r why=records_changed", user_dn)
            wanted, target = newer, user_dn
        raise DirectoryUnavailable("our records of this user keep changing; the outbox publishes them later")

    def converge(self, published: dict[str, Wanted], now: datetime) -> int:
        """After publications planned from rows read earlier (reconcile, provisioning): read the rows of
        those users again and publish (sync_user) each whose records changed meanwhile. Returns how
        many were published again; a failure leaves that user to the outbox rows of the change."""
        dns, again = list(published), 0
        for start in range(0, len(dns), 500):
            chunk = dns[start:start + 500]
            rows = outbox.planned_rows_of_many(self.db, chunk)
            for dn in chunk:
                if wanted_values(rows.get(dn, []), self.profiles, now).shown == published[dn].shown:
                    continue
                try:
                    self.sync_user(dn, now=now)
                    again += 1
                except AutoenrollError as exc:
                    log.warning("event=publish.converge_deferred dn=%r error=%r", dn, exc.detail)
        return again

    def _certificates_of(self, user_dn: str) -> list:
        """The user's rows as committed now (one statement, its own snapshot)."""
        return outbox.planned_rows_of(self.db, user_dn)

    def sync_ca(self) -> None:
        self.directory.publish_ca(self.ca_der, outbox.crl_der(self.db))

    def pending(self, user_dn: str) -> bool:
        """Whether publication rows of this user still wait (LDAP refused or was unreachable)."""
        return outbox.pending(self.db, user_dn)

    # -- the queue -------------------------------------------------------------------------
    def _claim(self, now: datetime, user_dn: str | None, limit: int) -> list[Outbox]:
        return outbox.claim(self.db, now, user_dn, limit, CLAIM)

    def drain(self, *, user_dn: str | None = None, limit: int = 200, now: datetime | None = None) -> int:
        """Process due rows (only this user's when given); returns how many were completed."""
        now = now or datetime.now(timezone.utc)
        rows = self._claim(now, user_dn, limit)
        by_target: dict[str, list[Outbox]] = {}
        for row in rows:
            by_target.setdefault("\0crl" if row.reason == "crl" else row.user_dn, []).append(row)
        done = 0
        for target, group in by_target.items():
            ids = [r.id for r in group]
            try:
                if target == "\0crl":
                    self.sync_ca()
                else:
                    self.sync_user(target, now=now)
            except UserNotFound:
                self.complete(ids, note=USER_GONE)
                self.db.run(lambda s, t=target, g=group: audit.append(
                    s, event="publish.user_gone", outcome="failed", actor="outbox", subject=g[0].email,
                    detail={"dn": t, "rows": len(g), "serials": [r.serial for r in g if r.serial]}))
                log.warning("event=publish.user_gone target=%r rows=%d", target, len(ids))
                done += len(ids)
                continue
            except SchemaRefused as exc:
                self.complete(ids, note=f"{SCHEMA_REFUSED}: {exc.detail}"[:500])
                self.db.run(lambda s, t=target, g=group, e=exc: audit.append(
                    s, event="publish.schema_refused", outcome="failed", actor="outbox", subject=g[0].email,
                    detail={"dn": t, "rows": len(g), "serials": [r.serial for r in g if r.serial],
                            "directory_said": e.detail}))
                log.warning("event=publish.schema_refused target=%r rows=%d error=%r", target, len(ids), exc.detail)
                done += len(ids)
                continue
            except AutoenrollError as exc:
                self._failed(group, exc, now)
                log.warning("event=publish.retry target=%r rows=%d attempts=%d error=%r",
                            target, len(ids), group[0].attempts + 1, exc.detail)
                continue
            self._published(target, group)
            done += len(ids)
            log.info("event=publish.done target=%r rows=%d", target, len(ids))
        return done

    def publish_user_now(self, user_dn: str, now: datetime | None = None, *, rows: list | None = None,
                         certs: list | None = None, entry: UserEntry | None = None) -> bool:
        """The request path's inline attempt: publish this user's pending rows without claiming them
        (publication is idempotent, so racing the worker is harmless); True when nothing is left.

        `rows` and `certs` (the outbox rows just written and the user's certificate rows, read in the
        same transaction) spare the read. On success the rows are marked done by the batching thread
        (`Completions`), not in a transaction of their own; on failure they are made due now, for the
        worker. After an issuance (`rows` and `certs` given) the publication goes through the group
        commit (inline.py) when there is one: False then also when it waited longer than `inline_wait`
        for the publications ahead of it."""
        now = now or datetime.now(timezone.utc)
        if rows is not None and certs is not None and self.inline is not None and self.inline.available:
            return self.inline.publish(user_dn, rows=rows, certs=certs, entry=entry, wait=self.inline_wait)
        if rows is None or certs is None:
            # the rows and the records they ask for, in one snapshot
            rows, certs = outbox.open_rows_with_certificates(self.db, user_dn, certificates_of)
            if not rows:
                return True
        try:
            # The check of our records after the modify may fail to read (the database is down: the
            # store's DatabaseUnavailable): the certificate is committed whatever happens here, so its
            # request must not fail; the rows go to the worker, which publishes and checks again.
            self.sync_user(user_dn, now=now, certs=certs, entry=entry)
        except AutoenrollError as exc:
            log.warning("event=publish.deferred dn=%r error=%r", user_dn, exc.detail)
            self.due_now([r.id for r in rows], exc)
            return False
        self.completions.submit(user_dn, rows)
        return True

    def due_now(self, ids: list[int], exc: AutoenrollError) -> None:
        """Rows the request path held back for its inline attempt, handed to the worker at once."""
        try:
            outbox.due_now(self.db, ids, str(exc.detail))
        except Exception:  # they fall due by themselves a few seconds later
            log.exception("event=outbox.reschedule_failed rows=%d", len(ids))

    def _published(self, target: str, rows: list[Outbox]) -> None:
        """Mark the rows done and audit the publication, in one transaction (once, if the worker and
        the request path both published)."""
        self.db.run(lambda conn: audit.append_many(
            conn, mark_published(conn, [(target, rows)]), datetime.now(timezone.utc)), core=True)

    def complete(self, ids: list[int], note: str | None = None) -> None:
        """Mark outbox rows done (e.g. after reconcile or provisioning published the users directly)."""
        if not ids:
            return
        outbox.mark_done(self.db, ids, note)

    def refresh_crl_if_due(self, *, force_check: bool = False) -> bool:
        """Rebuild the CRL when it is past half its validity (checked at most once a minute)."""
        if self.ca is None:
            return False
        if not force_check and time.monotonic() - self._crl_checked < CRL_CHECK_SECONDS:
            return False
        self._crl_checked = time.monotonic()
        rebuilt = self.ca.refresh_crl_if_due() is not None
        if rebuilt:
            log.info("event=crl.refreshed reason=due")
        return rebuilt

    def _failed(self, rows: list[Outbox], exc: AutoenrollError, now: datetime) -> None:
        retries = []
        for row in rows:
            attempts = row.attempts + 1
            delay = backoff_delay(attempts, base=2.0, cap=MAX_BACKOFF, jitter=0.5)
            retries.append((row.id, attempts, now + timedelta(seconds=delay)))
        outbox.retry_later(self.db, retries, str(exc.detail))

    def run_forever(self, stop: threading.Event, interval: float = 2.0) -> None:
        """The outbox worker: drain until stopped; any error is logged and retried later."""
        while not stop.is_set():
            try:
                self.refresh_crl_if_due()
                while self.drain() and not stop.is_set():
                    pass
                while self.drain_targets() and not stop.is_set():
                    pass
            except Exception:  # a worker that dies silently would lose nothing but delay everything
                log.exception("event=publish.worker_error")
            stop.wait(interval)

    def start_thread(self, interval: float = 2.0) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run_forever, args=(stop, interval), name="outbox", daemon=True)
        thread.start()
        return thread, stop
