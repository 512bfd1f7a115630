"""Reconcile: make the directory tell the truth about the CA's certificates, and end entitlements.

One pass compares what LDAP shows with what the database knows, in memory, in dicts keyed by DN:

- a user who is no longer in any group of a certificate's profile, or no longer in LDAP at all, has
  their valid certificates of that profile revoked (affiliationChanged) and unpublished;
- a certificate belongs to the directory entry it was issued to, known by its stable id (entryUUID,
  LdapSettings.entry_id_attribute), not to an address: an entry renamed or moved to another DN is
  followed (its rows take the new DN), and the certificates of an address its entry no longer holds
  (the mail changed, or the address went to another entry) are revoked (affiliationChanged) and
  unpublished. Rows older than entry ids (NULL) are bound to the entry found at their DN on first
  sight; one whose DN is gone is followed by mail to the one entry that holds it (the rule before
  entry ids, the one case they cannot decide);
- this CA's values that should not be there (revoked, expired, superseded, another user's) are
  removed, current ones that are missing are added, and ours are put back in the order mail clients
  need (current encryption certificate first, see plan.py);
- values from other issuers are never touched; escrowed keys are never deleted.

A full pass reads every certificate row in one query, then, in one paged search (python-ldap, see
bulk.py), every user with mail who holds any certificate value, and reads the entries of the rows that
search did not meet (at their DN, by entry id, by address, as an incremental pass does); above
MAX_INCREMENTAL_LOOKUPS such rows it reads every user with mail instead. A user who holds no certificate
and has no row of ours has nothing to reconcile. Only the users the rows or our certificates concern
are kept: the pass's memory follows the number of certificates, not the directory's size. An incremental pass reads only
entries modified since the last run (`sync_state` row `reconcile.last_run`), the members of profile
groups that changed (the memberOf overlay does not touch a user's modifyTimestamp when a group drops
them, and refint removes deleted users from groups), and the users whose certificates were issued,
revoked or expired since; periodic mode runs a full pass first and then incremental ones.

A full pass then repairs each extra publication target ([targets.NAME], targets.py `TargetPublisher.repair`)
from the rows as the pass left them, with that target's attribute map: one modify per entry out of line,
none for an entry in line. A target that cannot be read is an error of the report; the others go on.

`plan_user` is the decision for one user: a pure function, tested without I/O.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone

from cryptography import x509

from directory_sync.bulk import BulkDirectory
from directory_sync.connection import values
from directory_sync.escape import filter_value, generalized_time
from directory_sync.ldap import addresses, entry_id_text
from directory_sync.plan import Wanted, plan_values, wanted_values
from directory_sync.publisher import USER_GONE
from registration_app.core.dn import dn_key  # the one DN normaliser; also the dict key on 100,000 users
from registration_app.core.entitlement import is_entitled
from registration_app.core.errors import AutoenrollError, DirectoryUnavailable, UserNotFound
from registration_app.core.model import Profile
from registration_app.store import audit
from registration_app.store import reconcile as records
from registration_app.store.db import Database
from registration_app.store.state import put_state, read_state

log = logging.getLogger("autoenroll.reconcile")

LAST_RUN = "reconcile.last_run"
LAST_REPORT = "reconcile.last_report"
NOT_ENTITLED, USER_NOT_IN_LDAP = "not entitled", "user gone"
ADDRESS_MOVED = "address no longer on the entry"
# modifyTimestamp has whole seconds and clocks drift a little: look back a bit further than the last run.
SINCE_MARGIN = timedelta(seconds=5)
# Above this many users to look up one by one, an incremental pass reads everything instead.
MAX_INCREMENTAL_LOOKUPS = 2000
MAX_PUBLISH_ERRORS = 20


@dataclass(frozen=True)
class CertRow:
    """What reconcile needs of one certificate row (duck-types Certificate for plan.wanted_values)."""

    serial: str
    user_dn: str
    email: str
    profile: str
    usage: str
    status: str
    der: bytes
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    entry_id: str | None = None  # the entry it was issued to (None: a row older than entry ids)


@dataclass(frozen=True)
class LdapUser:
    dn: str
    mails: tuple[str, ...]
    groups: frozenset[str]  # dn_key of each memberOf value
    certificates: tuple[bytes, ...]
    entry_id: str = ""


@dataclass(frozen=True)
class Revocation:
    serial: str
    email: str
    dn: str
    profile: str
    why: str


@dataclass(frozen=True)
class UserPlan:
    revoke: tuple[Revocation, ...] = ()
    publish: Wanted | None = None  # what the entry must be brought to, or None when it is in line

    @property
    def empty(self) -> bool:
        return not self.revoke and self.publish is None


@dataclass
class ReconcileReport:
    mode: str  # "full" | "incremental"
    dry_run: bool
    started_at: datetime
    duration_seconds: float = 0.0
    users_scanned: int = 0
    certificates_checked: int = 0
    revoked: list[Revocation] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)  # DNs whose values were (or would be) changed
    moved: list[tuple[str, str]] = field(default_factory=list)  # (old DN, new DN)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (DN, why)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (DN, error)
    # (target name, DN) of the entries of extra publication targets whose values were (or would be) changed
    targets_republished: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.revoked or self.republished or self.moved or self.targets_republished)

    def summary(self) -> str:
        verb = "would " if self.dry_run else ""
        return (f"reconcile {self.mode}{' (dry run)' if self.dry_run else ''}: "
                f"{self.users_scanned} users, {self.certificates_checked} certificates in "
                f"{self.duration_seconds:.2f} s; {verb}revoke {len(self.revoked)}, {verb}republish "
                f"{len(self.republished)}{self._in_targets()}, {verb}follow {len(self.moved)} renamed; "
                f"{len(self.skipped)} skipped, {len(self.errors)} errors")

    def _in_targets(self) -> str:
        return f" (and {len(self.targets_republished)} in targets)" if self.targets_republished else ""

    def lines(self) -> list[str]:
        verb = "would " if self.dry_run else ""
        out = [self.summary()]
        out += [f"  {verb}revoke {r.serial} ({r.profile}) of {r.email}: {r.why}" for r in self.revoked]
        out += [f"  {verb}follow renamed entry {old} -> {new}" for old, new in self.moved]
        out += [f"  {verb}republish {dn}" for dn in self.republished]
        out += [f"  {verb}republish {dn} in target {name}" for name, dn in self.targets_republished]
        out += [f"  skipped {dn}: {why}" for dn, why in self.skipped]
        out += [f"  error {dn}: {error}" for dn, error in self.errors]
        return out

    def as_dict(self) -> dict:
        body = asdict(self)
        body["started_at"] = self.started_at.isoformat()
        return body


# --- the decision for one user (pure) --------------------------------------------------------------
def plan_user(user: LdapUser | None, rows: list[CertRow], *, profiles: dict[str, Profile],
              entitled: Callable[[LdapUser, Profile], bool], now: datetime,
              known_ours: dict[bytes, str] | None = None) -> UserPlan:
    """What to do for one directory user (or one DN the database knows and LDAP does not).

    `known_ours` maps DER → dn_key of every certificate of ours that the pass knows, so that a value
    of ours sitting in the wrong entry is recognised and removed. Unknown values are never touched.
    """
    live = [r for r in rows if r.status == "valid" and r.not_after > now]
    if user is None:
        return UserPlan(revoke=tuple(Revocation(r.serial, r.email, r.user_dn, r.profile, USER_NOT_IN_LDAP)
                                     for r in live))
    revoke = []
    for r in live:
        profile = profiles.get(r.profile)
        if r.email.lower() not in user.mails:  # the certificate names an address the entry no longer has
            revoke.append(Revocation(r.serial, r.email, user.dn, r.profile, ADDRESS_MOVED))
        elif profile is not None and not entitled(user, profile):  # an unknown profile is left alone
            revoke.append(Revocation(r.serial, r.email, user.dn, r.profile, NOT_ENTITLED))
    gone = {r.serial for r in revoke}
    after = [replace(r, status="revoked") if r.serial in gone else r for r in rows]
    known = known_ours if known_ours is not None else {}
    mine = {r.der for r in rows}
    strays = [v for v in user.certificates if v in known and v not in mine]
    wanted = wanted_values(after, profiles, now, strays=strays)  # the order of plan.py, as everywhere
    if not plan_values(user.certificates, wanted).changes:
        return UserPlan(revoke=tuple(revoke))
    return UserPlan(revoke=tuple(revoke), publish=wanted)


# --- entitlement ---------------------------------------------------------------------------------
class Entitlement:
    """Who may hold which profile: the rule of issuance (core.entitlement.is_entitled) over each user's
    groups, read from their memberOf, or (without the overlay, or with nested groups) from the member
    lists of the profiles' groups. Bare group names are resolved under groups_base, as at start-up."""

    def __init__(self, directory, profiles: dict[str, Profile]) -> None:
        s = directory.settings
        self.from_memberof = s.use_memberof and not s.nested_groups
        self._groups = {name: frozenset(directory.group_dn(g) for g in p.groups) for name, p in profiles.items()}
        self._resolved = {name: replace(p, groups=self._groups[name]) for name, p in profiles.items()}
        self._members: dict[str, set[str]] = {}  # group DN -> member dn_keys
        if not self.from_memberof:
            for group in set().union(*self._groups.values()) if self._groups else ():
                self._members[group] = {dn_key(m) for m in directory.group_members(group)}

    def group_keys(self, profile: Profile, directory) -> set[str]:
        """dn_key of each group the profile names (bare cns resolved under groups_base)."""
        return set(self._groups.get(profile.name) or (directory.group_dn(g) for g in profile.groups))

    def __call__(self, user: LdapUser, profile: Profile) -> bool:
        resolved = self._resolved.get(profile.name)
        if resolved is None:
            return False
        if self.from_memberof:
            return is_entitled(resolved, user.groups)
        key = dn_key(user.dn)
        return is_entitled(resolved, {g for g in resolved.groups if key in self._members.get(g, ())})


# --- the pass -------------------------------------------------------------------------------------
class Reconciler:
    def __init__(self, db: Database, directory, ca, publisher, profiles: dict[str, Profile], *,
                 actor: str = "reconcile") -> None:
        self.db = db
        self.directory = directory  # LdapDirectory
        self.ca = ca  # LocalCA
        self.publisher = publisher
        self.profiles = dict(profiles)
        self.actor = actor
        self.settings = directory.settings
        self.names = directory.settings.attributes
        self._group_keys: dict[bytes, str] = {}

    # -- reading LDAP --
    def _attributes(self) -> list[str]:
        return [self.settings.mail_attribute, *sorted(self.settings.also_find_by), self.names.member_of,
                self.names.certificate, self.settings.entry_id_attribute]

    def _user(self, dn: str, attrs: dict[str, list[bytes]]) -> LdapUser:
        keys = self._group_keys  # 100,000 users share a handful of groups: normalise each once
        groups = []
        for value in values(attrs, self.names.member_of):
            key = keys.get(value)
            if key is None:
                key = keys[value] = dn_key(value.decode())
            groups.append(key)
        return LdapUser(
            dn=dn,
            mails=tuple(m.lower() for m in addresses(self.settings, attrs)),
            groups=frozenset(groups),
            certificates=tuple(values(attrs, self.names.certificate)),
            entry_id=entry_id_text(values(attrs, self.settings.entry_id_attribute)),
        )

    def _scan_users(self, bulk: BulkDirectory, since: datetime | None = None) -> dict[str, LdapUser]:
        flt = f"({self.settings.mail_attribute}=*)"
        if since is not None:
            flt = f"(&{flt}({self.names.modify_timestamp}>={_generalized(since)}))"
        return {dn_key(dn): self._user(dn, attrs)
                for dn, attrs in bulk.scan(self.settings.users_base, flt, self._attributes())}

    # -- reading the database --
    @staticmethod
    def _rows(session, **which) -> list[CertRow]:
        result = records.certificate_rows(session, **which)
        utc = timezone.utc
        return [CertRow(s, dn, e, p, u, st, der, _aware(nb, utc), _aware(na, utc), _aware(ia, utc), eid)
                for s, dn, e, p, u, st, der, nb, na, ia, eid in result]

    def _rows_of(self, dns: Iterable[str], entry_ids: Iterable[str] = ()) -> list[CertRow]:
        """The rows of these DNs, and of these entries wherever their rows say they are (renamed ones)."""
        dns, entry_ids = list(dict.fromkeys(dns)), list(dict.fromkeys(entry_ids))
        out: dict[str, CertRow] = {}
        with self.db.transaction() as session:
            out.update((r.serial, r) for r in self._rows(session, user_dns=dns, entry_ids=entry_ids))
        return list(out.values())

    # -- the passes --
    def run(self, *, dry_run: bool = False, incremental: bool = False,
            now: datetime | None = None) -> ReconcileReport:
        now = now or datetime.now(timezone.utc)
        clock = time.monotonic()
        since = self.last_run() if incremental else None
        report = ReconcileReport(mode="incremental" if since is not None else "full", dry_run=dry_run,
                                 started_at=now)
        entitled = Entitlement(self.directory, self.profiles)
        with BulkDirectory(self.directory) as bulk:
            partial = True  # only a part of LDAP was read: a row's entry not met is looked up
            if since is None:
                users, rows, known, scanned, partial = self._full_inputs(bulk)
            else:
                users, rows, known = self._incremental_inputs(bulk, entitled, since - SINCE_MARGIN, now)
                scanned = len(users or ())
                if users is None:  # too much changed: a full pass is cheaper than lookups
                    report.mode = "full"
                    users, rows, known, scanned, partial = self._full_inputs(bulk)
            report.users_scanned, report.certificates_checked = scanned, len(rows)
            self._reconcile(bulk, users, rows, known, entitled, report, now, dry_run, partial=partial)
        if report.mode == "full":
            self._repair_targets(report, now, dry_run)
        report.duration_seconds = round(time.monotonic() - clock, 3)
        if not dry_run:
            self._remember(report)
        log.info("event=reconcile.done mode=%s dry_run=%s users=%d certificates=%d revoked=%d "
                 "republished=%d moved=%d errors=%d seconds=%.2f", report.mode, dry_run, report.users_scanned,
                 report.certificates_checked, len(report.revoked), len(report.republished), len(report.moved),
                 len(report.errors), report.duration_seconds)
        return report

    def _full_inputs(self, bulk):
        """(users, rows, known, users read, partial): partial when only the holders of certificates
        and the entries at the rows' DNs were read (the rest of a row's lookups happen in the pass)."""
        with self.db.transaction() as session:
            rows = self._rows(session)
        known = {r.der: dn_key(r.user_dn) for r in rows}
        holders = f"(&({self.settings.mail_attribute}=*)({self.names.certificate.split(';')[0]}=*))"
        users, scanned = self._scan_concerned(bulk, rows, known, holders)
        base = dn_key(self.settings.users_base)
        unmet = list(dict.fromkeys(r.user_dn for r in rows if dn_key(r.user_dn) not in users
                                   and _under(dn_key(r.user_dn), base)))
        if len(unmet) > MAX_INCREMENTAL_LOOKUPS:  # e.g. the directory lost its values: read everyone
            users, scanned = self._scan_concerned(bulk, rows, known, f"({self.settings.mail_attribute}=*)")
            return users, rows, known, scanned, False
        mail = self.settings.mail_attribute
        for dn in unmet:
            attrs = bulk.read(dn, self._attributes())
            if attrs is not None and values(attrs, mail):  # a user as the search would have found them
                users[dn_key(dn)] = self._user(dn, attrs)
                scanned += 1
        return users, rows, known, scanned, True

    def _scan_concerned(self, bulk, rows: list[CertRow], known: dict[bytes, str],
                        flt: str) -> tuple[dict[str, LdapUser], int]:
        """The users `flt` finds, a page at a time, and how many; kept are only the users a row names
        (by DN, entry id or address: a row's entry may have moved) and those holding a certificate of
        ours. Every other user has nothing of ours to check (plan_user would have nothing to do)."""
        keys = {dn_key(r.user_dn) for r in rows}
        ids = {r.entry_id for r in rows if r.entry_id}
        mails = {r.email.lower() for r in rows}
        mail, certificate, entry_id = (self.settings.mail_attribute.lower(), self.names.certificate.lower(),
                                       self.settings.entry_id_attribute.lower())
        users: dict[str, LdapUser] = {}
        scanned = 0
        for dn, attrs in bulk.scan(self.settings.users_base, flt, self._attributes()):
            scanned += 1
            key = dn_key(dn)
            if (key in keys or any(v in known for v in attrs.get(certificate, ()))
                    or (ids and entry_id_text(attrs.get(entry_id, [])) in ids)
                    or any(v.decode("utf-8", "replace").lower() in mails for v in attrs.get(mail, ()))):
                users[key] = self._user(dn, attrs)
        return users, scanned

    def _incremental_inputs(self, bulk, entitled: Entitlement, since: datetime, now: datetime):
        users = self._scan_users(bulk, since)
        dns: set[str] = set()
        # Users whose certificates changed in the database (issued, revoked) or expired since.
        with self.db.transaction() as session:
            dns |= records.dns_changed_since(session, since, now)
        # Groups that changed: their former members show nothing on their own entries.
        changed_groups = {dn_key(dn) for dn, _ in bulk.scan(
            self.settings.groups_base, f"({self.names.modify_timestamp}>={_generalized(since)})", ["1.1"])}
        affected = [name for name, p in self.profiles.items()
                    if self.settings.nested_groups and changed_groups
                    or changed_groups & entitled.group_keys(p, self.directory)]
        for name in affected:
            # Who left shows on no user entry: compare the profile's holders with the groups' current
            # member lists (one read per group) and look up only the holders no group lists any more.
            members = self._profile_members(bulk, self.profiles[name])
            for dn in records.current_holders(self.db, name, now):
                if members is None or dn_key(dn) not in members:
                    dns.add(dn)
        lookups = [dn for dn in dns if dn_key(dn) not in users]
        if len(lookups) > MAX_INCREMENTAL_LOOKUPS:
            return None, None, None
        for dn in lookups:
            attrs = bulk.read(dn, self._attributes())
            if attrs is not None:
                users[dn_key(dn)] = self._user(dn, attrs)
        rows = self._rows_of({*dns, *(u.dn for u in users.values())}, {u.entry_id for u in users.values() if u.entry_id})
        known = {r.der: dn_key(r.user_dn) for r in rows}
        return users, rows, known

    def _profile_members(self, bulk, profile: Profile) -> set[str] | None:
        """dn_keys of the direct members of the profile's groups; None when groups nest (then every
        holder of the profile is looked up)."""
        if self.settings.nested_groups:
            return None
        members: set[str] = set()
        attribute = self.settings.group_member_attribute
        for group in profile.groups:
            attrs = bulk.read(self.directory.group_dn(group), [attribute])
            members |= {dn_key(v.decode()) for v in values(attrs or {}, attribute)}
        return members

    def _reconcile(self, bulk, users: dict[str, LdapUser], rows: list[CertRow], known: dict[bytes, str],
                   entitled: Entitlement, report: ReconcileReport, now: datetime, dry_run: bool, *,
                   partial: bool) -> None:
        by_dn, bound = self._by_entry(bulk, users, rows, now, report, partial=partial)
        moves = self._follow_renames(bulk, users, by_dn, now, report, partial=partial)
        if (moves or bound) and not dry_run:
            self._apply_moves(moves, bound)
        plans: dict[str, UserPlan] = {}
        for key in users.keys() | by_dn.keys():
            user, user_rows = users.get(key), by_dn.get(key, [])
            if user is not None and not user_rows and not any(v in known for v in user.certificates):
                continue  # the common case of a user we never issued anything to
            plan = plan_user(user, user_rows, profiles=self.profiles, entitled=entitled, now=now,
                             known_ours=known)
            if not plan.empty:
                plans[key] = plan
        for key, plan in plans.items():
            report.revoked += plan.revoke
            if plan.publish is not None:
                report.republished.append(users[key].dn)
        if dry_run or not plans:
            return
        revoked = self._revoke([r for p in plans.values() for r in p.revoke], now)
        rows = self._revocation_rows(revoked)
        done: list[int] = []  # the outbox rows of our revocations, published by this pass itself
        gone: list[int] = []
        published: dict[str, Wanted] = {}
        for key, plan in plans.items():
            user = users.get(key)
            mine = [i for r in plan.revoke for i in rows.get(r.serial, ())]
            if user is None:
                gone += mine
                continue
            if plan.publish is not None:
                try:
                    bulk.publish(user.dn, list(user.certificates), plan.publish)
                    published[user.dn] = plan.publish
                except UserNotFound:
                    report.errors.append((user.dn, "the entry disappeared during the pass"))
                    continue
                except AutoenrollError as exc:
                    report.errors.append((user.dn, exc.detail))
                    if len(report.errors) >= MAX_PUBLISH_ERRORS:
                        self.publisher.complete(done)
                        self.publisher.complete(gone, note=USER_GONE)
                        raise DirectoryUnavailable("reconcile stopped: the directory refuses too many changes; "
                                                   "the outbox keeps what was revoked") from exc
                    continue
            done += mine
        self.publisher.complete(done)  # one transaction per 500 rows, not two per user
        self.publisher.complete(gone, note=USER_GONE)
        # The pass planned from rows read at its start: users whose records changed since (a revocation
        # that raced the pass) are published again from their rows now.
        self.publisher.converge(published, now)
        if revoked:
            self.publisher.drain(limit=100000)  # the new CRL to the CA entry, and anything else due

    def _repair_targets(self, report: ReconcileReport, now: datetime, dry_run: bool) -> None:
        """Each extra publication target brought in line with the rows as this pass left them (a dry
        run: as it would leave them, its revocations applied in memory)."""
        targets = getattr(self.publisher, "targets", ())
        if not targets:
            return
        with self.db.transaction() as session:
            rows = self._rows(session)
        if dry_run:
            revoked = {r.serial for r in report.revoked}
            rows = [replace(r, status="revoked") if r.serial in revoked else r for r in rows]
        for target in targets:
            try:
                repair = target.repair(rows, now, dry_run=dry_run)
            except AutoenrollError as exc:
                report.errors.append((f"target {target.name}", exc.detail))
                log.warning("event=reconcile.target_failed target=%r error=%r", target.name, exc.detail)
                continue
            report.targets_republished += [(target.name, dn) for dn in repair.republished]
            report.skipped += [(f"{dn} (target {target.name})", why) for dn, why in repair.skipped]
            report.errors += [(f"{dn} (target {target.name})", error) for dn, error in repair.errors]

    def _revoke(self, revocations: list[Revocation], now: datetime) -> set[str]:
        if not revocations:
            return set()
        details = {r.serial: {"why": r.why, "dn": r.dn, "profile": r.profile} for r in revocations}
        changed = self.ca.revoke_many([r.serial for r in revocations], x509.ReasonFlags.affiliation_changed,
                                      actor=self.actor, now=now, details=details)
        for r in revocations:
            log.info("event=reconcile.revoked serial=%s email=%r why=%r", r.serial, r.email, r.why)
        return set(changed)

    def _revocation_rows(self, revoked: set[str]) -> dict[str, list[int]]:
        """serial → the open outbox rows our own revocations queued (the pass publishes those users itself)."""
        return records.open_revocation_rows(self.db, sorted(revoked))

    def _by_entry(self, bulk, users: dict[str, LdapUser], rows: list[CertRow], now: datetime,
                  report: ReconcileReport, *, partial: bool
                  ) -> tuple[dict[str, list[CertRow]], list[tuple[CertRow, str]]]:
        """The rows by the dn_key of the entry they belong to, and (row, its DN before) for each row
        whose DN or entry id changes now.

        A row with an entry id belongs to the entry with that id wherever it is (a DN that changed is a
        move, reported and applied); if no entry has the id any more, to nobody: it is filed under a key
        no user has, so plan_user revokes it as gone. A row without one (older than entry ids) takes the
        id of the entry at its DN (first sight); if its DN is gone it is left for `_follow_renames`."""
        by_id: dict[str, str | None] = {u.entry_id: key for key, u in users.items() if u.entry_id}
        by_dn: dict[str, list[CertRow]] = {}
        bound: list[tuple[CertRow, str]] = []
        for r in rows:
            key = dn_key(r.user_dn)
            if r.entry_id is None:
                user = users.get(key)
                if user is not None and user.entry_id:
                    r = replace(r, entry_id=user.entry_id)
                    bound.append((r, r.user_dn))
                by_dn.setdefault(key, []).append(r)
                continue
            if r.entry_id not in by_id and partial:  # only a part of LDAP was read
                by_id[r.entry_id] = None  # one search per entry id, found or not
                flt = f"({self.settings.entry_id_attribute}={filter_value(r.entry_id)})"
                for dn, attrs in bulk.scan(self.settings.users_base, flt, self._attributes()):
                    user = users.setdefault(dn_key(dn), self._user(dn, attrs))
                    if user.entry_id == r.entry_id:
                        by_id[r.entry_id] = dn_key(dn)
            home = by_id.get(r.entry_id)
            if home is None:
                by_dn.setdefault(f"gone:{r.entry_id}", []).append(r)
                continue
            if home != key:
                new_dn = users[home].dn
                if (r.user_dn, new_dn) not in report.moved:
                    report.moved.append((r.user_dn, new_dn))
                bound.append((replace(r, user_dn=new_dn), r.user_dn))
                r = bound[-1][0]
            by_dn.setdefault(home, []).append(r)
        return by_dn, bound

    def _follow_renames(self, bulk, users: dict[str, LdapUser], by_dn: dict[str, list[CertRow]],
                        now: datetime, report: ReconcileReport, *, partial: bool
                        ) -> list[tuple[str, str, list[CertRow], str | None]]:
        """DNs with live certificates older than entry ids that LDAP no longer has, whose mail is on
        exactly one other entry (the rows then take that entry's id)."""
        missing = [(key, rows) for key, rows in by_dn.items() if key not in users and not key.startswith("gone:")
                   and any(r.status == "valid" and r.not_after > now for r in rows)]
        if not missing:
            return []
        by_mail: dict[str, list[str]] = {}
        for key, user in users.items():
            for mail in user.mails:
                by_mail.setdefault(mail, []).append(key)
        moves = []
        for key, rows in missing:
            email = rows[0].email.lower()
            found = by_mail.get(email)
            if partial:  # only a part of LDAP was read: every entry with the address, to see duplicates
                found = []
                flt = f"({self.settings.mail_attribute}={filter_value(email)})"
                for dn, attrs in bulk.scan(self.settings.users_base, flt, self._attributes()):
                    users.setdefault(dn_key(dn), self._user(dn, attrs))
                    found.append(dn_key(dn))
            if not found:
                continue  # truly gone: plan_user revokes
            if len(found) > 1:  # neither revoke nor follow: an operator must resolve the duplicate
                report.skipped.append((rows[0].user_dn, f"{email} is on {len(found)} entries: not guessing"))
                del by_dn[key]
                continue
            new = users[found[0]]
            moves.append((rows[0].user_dn, new.dn, rows, new.entry_id or None))
            report.moved.append((rows[0].user_dn, new.dn))
            by_dn.setdefault(found[0], []).extend(replace(r, user_dn=new.dn, entry_id=new.entry_id or None)
                                                  for r in rows)
            del by_dn[key]
        return moves

    def _apply_moves(self, moves: list[tuple[str, str, list[CertRow], str | None]],
                     bound: list[tuple[CertRow, str]]) -> None:
        """Rows take the DN and entry id they were found to belong to (followed by mail, bound on first
        sight, or moved with their entry); each change of DN is audited as directory.user_moved."""
        changes: dict[tuple[str, str | None], list[str]] = {}  # (DN, entry id) → serials
        moved: dict[tuple[str, str], tuple[str, list[str]]] = {}  # (old DN, new DN) → (email, serials)
        for old, new, rows, entry_id in moves:
            changes.setdefault((new, entry_id), []).extend(r.serial for r in rows)
            moved.setdefault((old, new), (rows[0].email, []))[1].extend(r.serial for r in rows)
        for r, old in bound:
            changes.setdefault((r.user_dn, r.entry_id), []).append(r.serial)
            if dn_key(old) != dn_key(r.user_dn):
                moved.setdefault((old, r.user_dn), (r.email, []))[1].append(r.serial)

        def work(session):
            for (dn, entry_id), serials in changes.items():
                records.move_rows(session, serials, dn, entry_id)
            for (old, new), (email, serials) in moved.items():
                audit.append(session, event="directory.user_moved", outcome="done", actor=self.actor,
                             subject=email, detail={"from": old, "to": new, "serials": serials})
        self.db.run(work)

    # -- state --
    def last_run(self) -> datetime | None:
        value = read_state(self.db, LAST_RUN)
        return datetime.fromisoformat(value) if value is not None else None

    def _remember(self, report: ReconcileReport) -> None:
        summary = json.dumps({"mode": report.mode, "started_at": report.started_at.isoformat(),
                              "seconds": report.duration_seconds, "users": report.users_scanned,
                              "revoked": len(report.revoked), "republished": len(report.republished),
                              "moved": len(report.moved), "errors": len(report.errors),
                              "targets_republished": len(report.targets_republished)})

        def work(session):
            for name, value in ((LAST_RUN, report.started_at.isoformat()), (LAST_REPORT, summary)):
                put_state(session, name, value)
        self.db.run(work)


def last_report(db: Database) -> dict | None:
    """The summary of the last reconcile pass (for `sync status` and /health), or None."""
    value = read_state(db, LAST_REPORT)
    return json.loads(value) if value is not None else None


def run_periodically(reconciler: Reconciler, every: float, *, incremental: bool, echo: Callable[[str], None],
                     stop=None) -> None:
    """A full pass first, then one pass every `every` seconds (incremental ones if asked), until stopped."""
    import threading
    stop = stop or threading.Event()
    first = True
    while not stop.is_set():
        started = time.monotonic()
        try:
            report = reconciler.run(incremental=incremental and not first)
            echo(report.summary())
            first = False
        except AutoenrollError as exc:
            echo(f"reconcile failed: {exc.detail}; trying again in {every:g} s")
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def _under(key: str, base: str) -> bool:
    """Whether the entry named by dn_key `key` is `base` or below it (what a subtree search reads)."""
    return key == base or key.endswith("," + base)


def _generalized(when: datetime) -> str:
    return generalized_time(when)


def _aware(when: datetime | None, utc) -> datetime | None:
    return when.replace(tzinfo=utc) if when is not None and when.tzinfo is None else when
