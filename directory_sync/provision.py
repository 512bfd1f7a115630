"""Bulk pre-provisioning: give every entitled member of a group an encryption certificate at once.

So that colleagues can encrypt to someone before that person has ever run the agent: the key is
generated here, escrowed, the certificate signed and published; the user collects the private key later
through self-service recovery (POST /api/v1/recover), authenticated with their signature certificate.

Fast because batched: for a batch of users, keys are generated, sealed for the KRA and certificates
signed in memory; then the escrow rows, certificate rows, outbox rows and audit rows of the whole batch
are committed in ONE transaction (escrow and certificate together, so no certificate exists whose key
is not escrowed; the audit chain is appended row by row inside it), and a second thread publishes the
batch while the next one is being signed: one modify per user, sent 100 to an LDAP transaction where
the directory offers them (slapd then commits once per 100, see ldap_txn.py), else pipelined.

Resumable and idempotent: a user who already has a current certificate of the profile is skipped, so a
second run issues nothing and an interrupted run picks up where it stopped; a batch whose publication
was interrupted stays in the outbox, which the server's worker (or `sync drain`) completes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from directory_sync.bulk import BulkDirectory
from directory_sync.connection import values
from directory_sync.escape import filter_value
from directory_sync.ldap import entry_id_text
from directory_sync.plan import wanted_values
from directory_sync.reconcile import Entitlement, LdapUser, dn_key
from registration_app.authorities.ca import ToRecord, serial_hex
from registration_app.authorities.certs import random_serial
from registration_app.authorities.escrow_crypto import escrow_aad, seal_private_key
from registration_app.core.errors import BadRequest
from registration_app.core.model import Profile, Subject, Usage
from registration_app.store import audit
from registration_app.store.models import Certificate, Escrow

log = logging.getLogger("autoenroll.provision")

BATCH = 200
BUILT_AHEAD = 4  # batches built and not yet recorded: enough to keep the builders busy
COMPLETE_EVERY = 1000  # published outbox rows marked done together
_ESCROW = Escrow.__table__
_INSERT_ESCROWS = insert(_ESCROW)  # executemany; the ids are read back by (unique) serial
_ESCROW_IDS = select(_ESCROW.c.serial, _ESCROW.c.id).where(_ESCROW.c.serial.in_(bindparam("serials", expanding=True)))


@dataclass
class ProvisionReport:
    group: str
    profile: str
    members: int = 0
    entitled: int = 0
    already: int = 0  # had a current certificate of the profile: skipped
    issued: int = 0
    published: int = 0
    queued: int = 0  # issued, publication left to the outbox (LDAP refused or was down)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (email, why): nothing issued
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f" ({self.issued / self.seconds:.0f}/s)" if self.issued and self.seconds else ""
        return (f"provision {self.profile} for {self.group}: {self.members} members, {self.entitled} entitled, "
                f"{self.already} already had one, {self.issued} issued{rate}, {self.published} published, "
                f"{self.queued} left in the outbox, {len(self.failed)} failed, {self.seconds:.2f} s")


@dataclass(frozen=True)
class _Member:
    dn: str
    email: str
    common_name: str
    certificates: tuple[bytes, ...]
    entry_id: str = ""  # the entry's stable id: the certificate is bound to it (UserEntry.entry_id)


@dataclass
class _Item:
    member: _Member
    serial: int
    cert: object
    blob: bytes
    replaces: str | None
    outbox: object = None
    outbox_id: int | None = None


class Provisioner:
    def __init__(self, services, *, kra_public_key, batch_size: int = BATCH, actor: str = "provision",
                 workers: int | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.ldap = services.settings.ldap
        self.db = services.db
        self.ca = services.ca
        self.kra_public_key = kra_public_key
        self.batch_size = batch_size
        self.actor = actor
        # Processes that generate, seal and sign (forked: they inherit the CA key, never receive it).
        self.workers = min(2, os.cpu_count() or 1) if workers is None else workers

    # -- who --------------------------------------------------------------------------------------
    def members(self, bulk: BulkDirectory, group: str) -> list[_Member]:
        """Members of `group` (DN or bare cn) that are entitled to `profile` come later; here: everyone."""
        directory = self.services.directory
        group_dn = directory.group_dn(group)
        names = self.ldap.attributes
        attrs = [self.ldap.mail_attribute, names.common_name, names.member_of, names.certificate,
                 self.ldap.entry_id_attribute]
        if self.ldap.use_memberof and not self.ldap.nested_groups:
            flt = f"(&({self.ldap.mail_attribute}=*)({names.member_of}={filter_value(group_dn)}))"
            entries = list(bulk.scan(self.ldap.users_base, flt, attrs))
        else:
            wanted = {dn_key(m) for m in directory.group_members(group_dn)}
            entries = [(dn, a) for dn, a in bulk.scan(self.ldap.users_base, f"({self.ldap.mail_attribute}=*)", attrs)
                       if dn_key(dn) in wanted]
        self._entries = {dn_key(dn): a for dn, a in entries}
        out = []
        for dn, a in entries:
            mails = values(a, self.ldap.mail_attribute)
            common_names = values(a, names.common_name)
            out.append(_Member(dn=dn, email=mails[0].decode(),
                               common_name=common_names[0].decode() if common_names else "",
                               certificates=tuple(values(a, names.certificate)),
                               entry_id=entry_id_text(values(a, self.ldap.entry_id_attribute))))
        return out

    def _entitled(self, members: list[_Member], profile: Profile) -> list[_Member]:
        entitlement = Entitlement(self.services.directory, {profile.name: profile})
        out = []
        for m in members:
            a = self._entries[dn_key(m.dn)]
            user = LdapUser(dn=m.dn, mails=(m.email.lower(),),
                            groups=frozenset(dn_key(v.decode()) for v in values(a, self.ldap.attributes.member_of)),
                            certificates=m.certificates)
            if entitlement(user, profile):
                out.append(m)
        return out

    # -- the run ----------------------------------------------------------------------------------
    def run(self, group: str, profile: Profile, *, progress: Callable[[int, int], None] | None = None,
            now: datetime | None = None, dry_run: bool = False) -> ProvisionReport:
        if profile.usage is not Usage.ENCRYPTION:
            raise BadRequest(f"profile {profile.name!r} is not an encryption profile: signature keys are "
                             "generated by their owners, and nobody else may hold them")
        clock = time.monotonic()
        now = now or datetime.now(timezone.utc)
        report = ProvisionReport(group=group, profile=profile.name)
        with BulkDirectory(self.services.directory) as bulk:
            members = self.members(bulk, group)
        report.members = len(members)
        entitled = self._entitled(members, profile)
        report.entitled = len(entitled)
        current, latest = self._issued(profile, now)
        seen: set[str] = set()
        todo = []
        for m in entitled:
            email = m.email.lower()
            if email in current:
                report.already += 1
            elif email in seen:  # two entries with one address: the RA refuses such users, so do we
                report.failed.append((m.email, "several directory entries have this address"))
            else:
                seen.add(email)
                todo.append(m)
        if dry_run:
            report.issued = len(todo)  # would issue
            report.seconds = round(time.monotonic() - clock, 3)
            return report
        if progress is not None:
            progress(0, len(todo))  # (advance, total)
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        jobs = [([(m.dn, m.email, m.common_name) for m in b], profile,
                 {m.email.lower(): latest.get(m.email.lower()) for m in b}, now) for b in batches]
        builder = self._builder(len(batches))  # forked before any thread of ours starts
        publishing = _PublishThread(self, processes=1 if self.workers > 0 and len(batches) > 1 else 0)
        publishing.start()
        try:
            for batch, built in zip(batches, _in_order(builder, jobs)):
                items = [_Item(member=m, serial=serial, cert=x509.load_der_x509_certificate(der), blob=blob,
                               replaces=replaces) for m, (serial, der, blob, replaces) in zip(batch, built)]
                items = self._commit(items, profile, group, now, report)
                report.issued += len(items)
                publishing.put(items)
                if progress is not None:
                    progress(len(batch), len(todo))
        finally:
            publishing.finish()
            builder.terminate()  # every result was consumed, or we are failing anyway
        report.published, report.queued = publishing.published, publishing.queued
        report.seconds = round(time.monotonic() - clock, 3)
        log.info("event=provision.done group=%r profile=%s issued=%d published=%d queued=%d failed=%d seconds=%.2f",
                 group, profile.name, report.issued, report.published, report.queued, len(report.failed),
                 report.seconds)
        return report

    def _issued(self, profile: Profile, now: datetime) -> tuple[set[str], dict[str, str]]:
        """(emails with a current certificate of the profile, newest serial per email) from the database.

        A current certificate of another encryption profile counts as one of this profile (a user holds
        one current encryption certificate, as enroll enforces), unless either profile has coexist."""
        current: set[str] = set()
        latest: dict[str, tuple[datetime, str]] = {}
        names = {profile.name}
        if not profile.coexist:
            names |= {p.name for p in self.settings.profiles.values()
                      if p.usage is Usage.ENCRYPTION and not p.coexist}
        with self.db.transaction() as session:
            for email, serial, name, status, not_after, issued_at in session.execute(
                    select(Certificate.email, Certificate.serial, Certificate.profile, Certificate.status,
                           Certificate.not_after, Certificate.issued_at).where(Certificate.profile.in_(names))):
                email = email.lower()
                if status == "valid" and not_after > now:
                    current.add(email)
                if name == profile.name and (email not in latest or issued_at > latest[email][0]):
                    latest[email] = (issued_at, serial)
        return current, {e: s for e, (_, s) in latest.items()}

    def _builder(self, batches: int):
        """A fork pool when it pays (several batches, workers > 0), else this process."""
        global _FORKED
        _FORKED = (self.ca, self.kra_public_key, self.services.pool)
        if self.workers <= 0 or batches < 2:
            return _InProcess()
        return multiprocessing.get_context("fork").Pool(self.workers)

    def _commit(self, items: list[_Item], profile: Profile, group: str, now: datetime,
                report: ProvisionReport) -> list[_Item]:
        """Record a batch in one transaction; if a concurrent enrollment collides (renewal_key), record
        the users one by one and skip those who got a certificate meanwhile."""
        try:
            self.db.run(lambda conn: self._record(conn, items, profile, group, now), core=True)
            return items
        except IntegrityError:
            pass
        kept = []
        for item in items:
            try:
                self.db.run(lambda conn, i=item: self._record(conn, [i], profile, group, now), core=True)
                kept.append(item)
            except IntegrityError:
                report.failed.append((item.member.email, "a certificate was issued meanwhile"))
        return kept

    def _record(self, conn, items: list[_Item], profile: Profile, group: str, now: datetime) -> None:
        """Escrow rows, then certificate + outbox rows, then one audit row per certificate (escrow id
        in its detail), all in the caller's transaction: committed together or not at all. A few
        executemany statements per batch, not one per row."""
        serials = [serial_hex(i.serial) for i in items]
        conn.execute(_INSERT_ESCROWS, [dict(serial=serial, email=i.member.email, profile=profile.name, blob=i.blob,
                                            created_at=now) for serial, i in zip(serials, items)])
        by_serial = dict(conn.execute(_ESCROW_IDS, {"serials": serials}).all())
        escrow_ids = [by_serial[serial] for serial in serials]
        outboxes, events = self.ca.record_issued_many(conn, [ToRecord(
            i.cert, profile, Subject(email=i.member.email, common_name=i.member.common_name or None),
            i.member.dn, i.replaces, "server",
            {"escrowed": True, "escrow_id": escrow_id, "provisioned_for": group}, i.member.entry_id or None)
            for i, escrow_id in zip(items, escrow_ids)], actor=self.actor, now=now)
        audit.append_many(conn, events, now)
        for item, outbox in zip(items, outboxes):
            item.outbox, item.outbox_id = outbox, outbox.id

    # -- publication (called from the publishing thread) ------------------------------------------
    def publication_jobs(self, items: list[_Item], now: datetime) -> list[tuple]:
        """(dn, values read by the member scan, what our records want (plan.Wanted), outbox id) per user."""
        dns = [i.member.dn for i in items]
        rows: dict[str, list] = {}
        table = Certificate.__table__
        columns = [table.c[name] for name in ("user_dn", "der", "status", "profile", "usage", "not_after",
                                              "issued_at")]
        with self.db.read_connection() as conn:  # plain rows: what wanted_values reads, no ORM objects
            for start in range(0, len(dns), 500):
                for cert in conn.execute(select(*columns).where(table.c.user_dn.in_(dns[start:start + 500]))):
                    rows.setdefault(cert.user_dn, []).append(cert)
        jobs = []
        for item in items:
            wanted = wanted_values(rows.get(item.member.dn, []), self.settings.profiles, now)
            jobs.append((item.member.dn, list(item.member.certificates), wanted, item.outbox_id))
        return jobs


# What forked builders inherit: (LocalCA, KRA public key, KeyPool). Set just before the fork.
_FORKED: tuple | None = None


def _build_batch(job) -> list[tuple[int, bytes, bytes, str | None]]:
    """Keys, escrow blobs and certificates of one batch, in memory (nothing is recorded yet):
    [(serial, certificate DER, escrow blob, serial it replaces)]. Runs in a forked worker."""
    members, profile, latest, now = job
    ca, kra_public_key, pool = _FORKED
    out = []
    for dn, email, common_name in members:
        key = pool.take(profile.key_type)
        serial = random_serial()
        blob = seal_private_key(key, kra_public_key, escrow_aad(serial, email, profile.name))
        cert = ca.build_certificate(key.public_key(), profile, Subject(email=email, common_name=common_name or None),
                                    serial=serial, now=now)
        out.append((serial, cert.public_bytes(Encoding.DER), blob, latest.get(email.lower())))
    return out


def _in_order(builder, jobs: list) -> Iterator[list]:
    """The built batches in order, with at most BUILT_AHEAD waiting to be recorded (a pool's imap
    would build them all at once, holding every key of a large group in memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(builder.apply_async(_build_batch, (job,)))
        if len(pending) > BUILT_AHEAD:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _InProcess:
    """The builder's surface, in this process."""

    def apply_async(self, func, args) -> _Built:
        return _Built(func(*args))

    def terminate(self) -> None:
        pass


@dataclass(frozen=True)
class _Built:
    result: list

    def get(self) -> list:
        return self.result


def _publish_batch(jobs) -> tuple[list[int], int]:
    """The batch's modifies, pipelined on one connection (runs in the forked publishing process, on
    its own connections); returns (outbox ids done, failures). A failure leaves the outbox row for
    the worker."""
    global _BULK
    if _BULK is None:
        from directory_sync.ldap import LdapDirectory
        _BULK = BulkDirectory(LdapDirectory(_FORKED_LDAP))  # never a connection of the parent's
    outcomes = _BULK.publish_many([(dn, current, wanted) for dn, current, wanted, _ in jobs])
    done = [job[-1] for job, error in zip(jobs, outcomes) if error is None]
    for (dn, *_), error in zip(jobs, outcomes):
        if error is not None:
            log.warning("event=provision.publish_deferred dn=%r error=%r", dn, error.detail)
    return done, len(jobs) - len(done)


_FORKED_LDAP = None
_BULK: BulkDirectory | None = None


class _PublishThread:
    """Publishes committed batches while the next one is built: this thread reads the database,
    a forked process talks to LDAP (so neither waits for the other's share of the GIL)."""

    def __init__(self, provisioner: Provisioner, processes: int) -> None:
        global _FORKED_LDAP
        self.p = provisioner
        _FORKED_LDAP = provisioner.ldap
        self.pool = multiprocessing.get_context("fork").Pool(1) if processes > 0 else None
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.published = self.queued = 0
        self._done: list[int] = []  # outbox ids published, not yet marked done
        self.thread = threading.Thread(target=self._work, name="provision-publish", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, items: list[_Item]) -> None:
        self.queue.put(items)

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def _work(self) -> None:
        pending = []  # (AsyncResult, jobs, now): at most two batches in flight
        while (items := self.queue.get()) is not None:
            # Whatever goes wrong with one batch, this thread keeps taking batches: the main loop
            # blocks on the queue otherwise. The batch's rows stay in the outbox for the worker.
            try:
                now = datetime.now(timezone.utc)
                jobs = self.p.publication_jobs(items, now)
                if self.pool is None:
                    self._collect(_publish_batch(jobs), jobs, now)
                    continue
                pending.append((self.pool.apply_async(_publish_batch, (jobs,)), jobs, now))
            except Exception as exc:
                self.queued += len(items)
                log.warning("event=provision.publish_skipped users=%d error=%r", len(items),
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
            self.p.services.publisher.converge(
                {dn: wanted for dn, _, wanted, outbox_id in jobs if outbox_id in published}, now)
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
            self.p.services.publisher.complete(done)
        except Exception as exc:  # the rows stay queued for the worker
            self.queued += len(done)
            log.warning("event=provision.complete_failed rows=%d error=%r", len(done), getattr(exc, "detail", exc))
            return
        self.published += len(done)
