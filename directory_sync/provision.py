"""The LDAP side of bulk provisioning (registration_app/ra/provision.py): who are the entitled members
of a group, and publishing many new certificates at once.

Publication runs beside the issuance: a thread reads the batch's certificate rows and plans each
entry's values (plan.py), a forked process sends the modifies, 100 to an LDAP transaction where the
directory offers them (slapd then commits once per 100, see ldap_txn.py), else pipelined. A batch whose
publication fails stays in the outbox, which the server's worker (or `sync drain`) completes.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from directory_sync.bulk import BulkDirectory
from directory_sync.config import LdapSettings
from directory_sync.connection import values
from directory_sync.ldap import LdapDirectory, entry_id_text
from directory_sync.plan import wanted_values
from directory_sync.reconcile import Entitlement, LdapUser, dn_key
from registration_app.core.model import Profile, UserEntry
from registration_app.store.batch import certificate_rows_of
from registration_app.store.db import Database

log = logging.getLogger("autoenroll.provision")

COMPLETE_EVERY = 1000  # published outbox rows marked done together


def group_members(directory: LdapDirectory, group: str, profile: Profile) -> tuple[int, list[UserEntry]]:
    """(how many members `group` (DN or bare cn) has, those of them entitled to `profile`), each as
    the entry read by one paged scan: its mail, cn, certificates and entry id."""
    ldap = directory.settings
    names = ldap.attributes
    group_dn = directory.group_dn(group)
    attrs = [ldap.mail_attribute, names.common_name, names.member_of, names.certificate, ldap.entry_id_attribute]
    with BulkDirectory(directory) as bulk:
        if ldap.use_memberof and (not ldap.nested_groups or names.in_chain_rule):
            flt = f"(&({ldap.mail_attribute}=*)({directory.member_of_filter(group_dn)}))"
            entries = list(bulk.scan(ldap.users_base, flt, attrs))
        else:
            wanted = {dn_key(m) for m in directory.group_members(group_dn)}
            entries = [(dn, a) for dn, a in bulk.scan(ldap.users_base, f"({ldap.mail_attribute}=*)", attrs)
                       if dn_key(dn) in wanted]
    entitlement = Entitlement(directory, {profile.name: profile})
    entitled = []
    for dn, a in entries:
        mail = values(a, ldap.mail_attribute)[0].decode()
        certificates = tuple(values(a, names.certificate))
        user = LdapUser(dn=dn, mails=(mail.lower(),),
                        groups=frozenset(dn_key(v.decode()) for v in values(a, names.member_of)),
                        certificates=certificates)
        if entitlement(user, profile):
            common_names = values(a, names.common_name)
            entitled.append(UserEntry(dn=dn, email=mail, common_name=common_names[0].decode() if common_names else "",
                                      certificates=certificates,
                                      entry_id=entry_id_text(values(a, ldap.entry_id_attribute))))
    return len(entries), entitled


@dataclass(frozen=True)
class ToPublish:
    """A new certificate's entry: its values as the member scan read them, and its outbox row."""

    dn: str
    current: tuple[bytes, ...]
    outbox_id: int | None


class BulkPublication:
    """Publishes committed batches while the next one is issued: this thread reads the database, a
    forked process (`processes=1`) talks to LDAP, so neither waits for the other's share of the GIL.
    The process gets the LDAP settings as its initializer's argument and opens its own connection."""

    def __init__(self, db: Database, publisher, ldap: LdapSettings, profiles: dict[str, Profile], *,
                 processes: int) -> None:
        self.db, self.publisher, self.ldap, self.profiles = db, publisher, ldap, profiles
        self.pool = multiprocessing.get_context("fork").Pool(
            1, initializer=_open_bulk_directory, initargs=(ldap,)) if processes > 0 else None
        self.local: BulkDirectory | None = None  # when publishing in this process
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.published = self.queued = 0
        self._done: list[int] = []  # outbox ids published, not yet marked done
        self.thread = threading.Thread(target=self._work, name="provision-publish", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, batch: Sequence[ToPublish]) -> None:
        self.queue.put(list(batch))

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
        if self.local is not None:
            self.local.close()

    def publication_jobs(self, batch: list[ToPublish], now: datetime) -> list[tuple]:
        """(dn, values read by the member scan, what our records want (plan.Wanted), outbox id) per entry."""
        rows = certificate_rows_of(self.db, [item.dn for item in batch])
        return [(item.dn, list(item.current), wanted_values(rows.get(item.dn, []), self.profiles, now), item.outbox_id)
                for item in batch]

    def _work(self) -> None:
        pending = []  # (AsyncResult, jobs, now): at most two batches in flight
        while (batch := self.queue.get()) is not None:
            # Whatever goes wrong with one batch, this thread keeps taking batches: the issuing loop
            # blocks on the queue otherwise. The batch's rows stay in the outbox for the worker.
            try:
                now = datetime.now(timezone.utc)
                jobs = self.publication_jobs(batch, now)
                if self.pool is None:
                    if self.local is None:
                        self.local = BulkDirectory(LdapDirectory(self.ldap))
                    self._collect(_publish_batch(self.local, jobs), jobs, now)
                    continue
                pending.append((self.pool.apply_async(_publish_in_worker, (jobs,)), jobs, now))
            except Exception as exc:
                self.queued += len(batch)
                log.warning("event=provision.publish_skipped users=%d error=%r", len(batch),
                            getattr(exc, "detail", exc))
                continue
            while len(pending) > 1:
                self._wait(*pending.pop(0))
        for result, jobs, now in pending:
            self._wait(result, jobs, now)
        self._complete()

    def _wait(self, result, jobs: list, now: datetime) -> None:
        try:
            outcome = result.get()
        except Exception as exc:  # the outbox keeps every row of this batch
            self.queued += len(jobs)
            log.warning("event=provision.publish_stopped error=%r", getattr(exc, "detail", exc))
            return
        self._collect(outcome, jobs, now)

    def _collect(self, outcome: tuple[list[int], int], jobs: list, now: datetime) -> None:
        done, _ = outcome
        self.queued += len(jobs) - len(done)
        self._done += done
        # Published from rows read before the modifies: users whose records changed since (a revocation
        # meanwhile) are published again from their rows now (see Publisher.sync_user).
        published = set(done)
        try:
            self.publisher.converge({dn: wanted for dn, _, wanted, outbox_id in jobs if outbox_id in published}, now)
        except Exception as exc:  # the changes' own outbox rows publish them
            log.warning("event=provision.converge_failed users=%d error=%r", len(published),
                        getattr(exc, "detail", exc))
        if len(self._done) >= COMPLETE_EVERY:
            self._complete()

    def _complete(self) -> None:
        """Mark the published rows done, in one transaction for several batches: fewer commits beside
        the batches' own. Rows not marked (the process dies first) are published again by the worker,
        which changes nothing in the directory."""
        done, self._done = self._done, []
        try:
            self.publisher.complete(done)
        except Exception as exc:  # the rows stay queued for the worker
            self.queued += len(done)
            log.warning("event=provision.complete_failed rows=%d error=%r", len(done), getattr(exc, "detail", exc))
            return
        self.published += len(done)


def _publish_batch(bulk: BulkDirectory, jobs: list[tuple]) -> tuple[list[int], int]:
    """The batch's modifies on one connection; returns (outbox ids done, failures). A failure leaves
    the outbox row for the worker."""
    outcomes = bulk.publish_many([(dn, current, wanted) for dn, current, wanted, _ in jobs])
    done = [job[-1] for job, error in zip(jobs, outcomes) if error is None]
    for (dn, *_), error in zip(jobs, outcomes):
        if error is not None:
            log.warning("event=provision.publish_deferred dn=%r error=%r", dn, error.detail)
    return done, len(jobs) - len(done)


# The publishing process's own connection, opened by its initializer (in the child, after the fork).
_WORKER_BULK: BulkDirectory | None = None


def _open_bulk_directory(ldap: LdapSettings) -> None:
    global _WORKER_BULK
    _WORKER_BULK = BulkDirectory(LdapDirectory(ldap))  # never a connection of the parent's


def _publish_in_worker(jobs: list[tuple]) -> tuple[list[int], int]:
    assert _WORKER_BULK is not None, "the pool's initializer opens it"
    return _publish_batch(_WORKER_BULK, jobs)
