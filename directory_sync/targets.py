"""Extra publication targets (`[targets.NAME]`): more directories that get the same certificates, for
example an OpenLDAP address book beside Active Directory, each with its own connection settings and
attribute map, and its own state of every outbox row.

The outbox row is written once, in the transaction of the change (the primary directory, [ldap], keeps
its state in that row). A target's state of a row lives in `target_outbox`: none yet means due. The
worker publishes each target in turn, in outbox order: it finds the user in the target by mail, plans
from our records as they are now (plan.py, the same planner as every writer), and applies one modify,
so publishing twice changes nothing and each value is there exactly once. A target that is down backs
off on its own rows and is tried again on the next pass; the primary and the other targets carry on.
Users and groups are only ever read from [ldap].

A full reconcile pass repairs each target too (`TargetPublisher.repair`): what was deleted or changed by
hand there is put back from our records, with the target's own attribute map, the way reconcile repairs
[ldap]; entries are matched by address, as the worker matches them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from directory_sync.bulk import BulkDirectory
from directory_sync.config import LdapSettings
from directory_sync.connection import values
from directory_sync.ldap import LdapDirectory, address_filter, addresses
from directory_sync.plan import plan_values, wanted_values
from registration_app.core.dn import dn_key
from registration_app.core.errors import AutoenrollError, DirectoryUnavailable, SchemaRefused, UserNotFound
from registration_app.core.model import Profile, Wanted
from registration_app.core.retry import backoff_delay
from registration_app.store import audit
from registration_app.store import targets as store
from registration_app.store.db import Database
from registration_app.store.outbox import crl_der, planned_rows_of

log = logging.getLogger("autoenroll.targets")

MAX_BACKOFF = 300.0
# How old an outbox row must be before a target's drain mark may pass it (store/targets.py): longer than
# any transaction that writes outbox rows stays open, so a row with a lower id committing late is not
# passed over. (Reconcile's full pass repairs a target even then.)
SETTLED = timedelta(minutes=5)
NOT_IN_TARGET = "not in this target"  # the target has no entry with the address: nothing to publish there
# A repair looks the users its scan of certificate holders did not meet up one by one up to this many;
# above it, it reads every entry with mail of the target instead (as reconcile does for [ldap]).
MAX_REPAIR_LOOKUPS = 2000


@dataclass
class Repair:
    """What a repair of one target did (or, dry, would do): entries whose values it changed, entries it
    left alone and why, entries it could not change."""

    republished: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


class TargetPublisher:
    """One extra target: its directory, and the outbox rows as they stand there."""

    def __init__(self, name: str, db: Database, directory: LdapDirectory, profiles: Mapping[str, Profile],
                 ca_certificate_der: bytes) -> None:
        self.name = name
        self.db = db
        self.directory = directory
        self.profiles = dict(profiles)
        self.ca_der = ca_certificate_der

    @classmethod
    def from_settings(cls, name: str, settings: LdapSettings, db: Database, profiles, ca_der: bytes):
        return cls(name, db, LdapDirectory(settings), profiles, ca_der)

    def drain(self, limit: int = 200, now: datetime | None = None) -> int:
        """Publish the rows due at this target, in outbox order; returns how many are done here. A target
        that does not answer ends the pass (its rows back off), so it never holds back the others."""
        now = now or datetime.now(timezone.utc)
        rows = store.due_at_target(self.db, self.name, now, limit)
        groups: dict[str, list] = {}
        for row in rows:
            groups.setdefault("\0crl" if row.reason == "crl" else row.user_dn, []).append(row)
        done = 0
        for key, group in groups.items():
            try:
                note = self._publish_ca() if key == "\0crl" else self._publish_user(key, group[0].email, now)
            except UserNotFound:
                note = NOT_IN_TARGET
            except SchemaRefused as exc:
                note = f"schema_refused: {exc.detail}"[:500]
                self.db.run(lambda s, g=group, e=exc: audit.append(
                    s, event="publish.schema_refused", outcome="failed", actor="outbox", subject=g[0].email,
                    detail={"target": self.name, "dn": key, "serials": [r.serial for r in g if r.serial],
                            "directory_said": e.detail}))
            except AutoenrollError as exc:
                self._record(group, now, error=exc)
                log.warning("event=publish.target_retry target=%r dn=%r rows=%d error=%r",
                            self.name, key, len(group), exc.detail)
                break  # most likely down: the rest waits for the next pass, the other targets do not
            self._record(group, now, note=note)
            done += len(group)
            log.info("event=publish.target_done target=%r dn=%r rows=%d%s", self.name, key, len(group),
                     f" note={note!r}" if note else "")
        # The mark below which every row has a state here (by the real clock, whatever `now` says).
        store.advance_at_target(self.db, self.name, settled_before=datetime.now(timezone.utc) - SETTLED)
        return done

    def status(self) -> dict:
        return target_status(self.db, self.name)

    def repair(self, rows: Iterable, now: datetime, *, dry_run: bool = False) -> Repair:
        """Bring every entry of this target that holds, or should hold, certificates of ours in line with
        `rows` (every certificate row, with user_dn, email and what plan.wanted_values reads), in one
        modify per entry that needs one (LdapDirectory.publish: asserted, pkiUser added where needed);
        entries already in line are not written. Other issuers' values stay byte for byte.

        A user of ours is the entry whose addresses hold the address of one of their certificates;
        an entry answering to the addresses of two of our users, or a user with two entries here, is
        skipped (never a guess). One paged search reads the entries holding any certificate value;
        the users with values to show that it did not meet are looked up by address. Raises what the
        directory answers when it cannot be read at all (the caller reports it; the target is down)."""
        by_user: dict[str, list] = {}
        for row in rows:
            by_user.setdefault(dn_key(row.user_dn), []).append(row)
        wanted = {key: wanted_values(user_rows, self.profiles, now) for key, user_rows in by_user.items()}
        known = {row.der: key for key, user_rows in by_user.items() for row in user_rows}
        owner: dict[str, str] = {}  # address → our user; one whose values are shown wins an address moved
        for key, user_rows in by_user.items():
            for address in {r.email.lower() for r in user_rows}:
                if address not in owner or wanted[key].shown:
                    owner[address] = key
        settings = self.directory.settings
        certificate = settings.attributes.certificate
        attributes = [settings.mail_attribute, *sorted(settings.also_find_by), certificate]
        found: dict[str, dict[str, list[bytes]]] = {}  # our user → {target DN: its values}
        orphans: dict[str, list[bytes]] = {}  # target DN → values, of entries that are nobody of ours
        repair = Repair()
        seen: set[str] = set()  # dn_keys met

        def meet(dn: str, attrs) -> None:
            if dn_key(dn) in seen:
                return
            seen.add(dn_key(dn))
            owners = {owner[a.lower()] for a in addresses(settings, attrs) if a.lower() in owner}
            if len(owners) > 1:
                repair.skipped.append((dn, "the entry has the addresses of several users: not guessing"))
            elif owners:
                found.setdefault(owners.pop(), {})[dn] = values(attrs, certificate)
            else:
                orphans[dn] = values(attrs, certificate)

        with BulkDirectory(self.directory) as bulk:
            holders = f"(&({settings.mail_attribute}=*)({certificate.split(';')[0]}=*))"
            for dn, attrs in bulk.scan(settings.users_base, holders, attributes):
                meet(dn, attrs)
            unmet = [key for key in by_user if wanted[key].shown and key not in found]
            if len(unmet) > MAX_REPAIR_LOOKUPS:
                found.clear()
                orphans.clear()
                seen.clear()
                repair.skipped.clear()
                for dn, attrs in bulk.scan(settings.users_base, f"({settings.mail_attribute}=*)", attributes):
                    meet(dn, attrs)
            else:
                for key in unmet:
                    for address in sorted({r.email.lower() for r in by_user[key]}):
                        if owner.get(address) != key:
                            continue
                        for dn, attrs in bulk.scan(settings.users_base, address_filter(settings, address),
                                                   attributes):
                            meet(dn, attrs)

        changes: list[tuple[str, Wanted]] = []
        for key, entries in found.items():
            if len(entries) > 1:
                repair.skipped += [(dn, f"one of {len(entries)} entries with the address: not guessing")
                                   for dn in entries]
                continue
            ((dn, current),) = entries.items()
            strays = frozenset(v for v in current if known.get(v, key) != key)  # another user's values of ours
            target = dataclasses.replace(wanted[key], remove=wanted[key].remove | strays)
            if plan_values(current, target).changes:
                changes.append((dn, target))
        for dn, current in orphans.items():
            strays = frozenset(v for v in current if v in known)
            if strays:
                changes.append((dn, Wanted(remove=strays)))
        for dn, target in changes:
            if not dry_run:
                try:
                    self.directory.publish(dn, target)
                except SchemaRefused as exc:  # this entry, for good: the others go on
                    repair.errors.append((dn, exc.detail))
                    continue
                except DirectoryUnavailable:
                    raise  # down: the pass says so; the outbox keeps this target's rows
                except AutoenrollError as exc:  # this entry only (it went away meanwhile, ...)
                    repair.errors.append((dn, exc.detail))
                    continue
            repair.republished.append(dn)
            log.info("event=reconcile.target_repaired target=%r dn=%r dry_run=%s", self.name, dn, dry_run)
        return repair

    def close(self) -> None:
        self.directory.close()

    # --- internals ---------------------------------------------------------------------------------
    def _publish_user(self, user_dn: str, email: str, now: datetime) -> str | None:
        entry = self.directory.find_user(email)  # the same person, by address, in this directory
        if entry is None:
            return NOT_IN_TARGET
        wanted = wanted_values(planned_rows_of(self.db, user_dn), self.profiles, now)
        self.directory.publish(entry, wanted)
        return None

    def _publish_ca(self) -> None:
        self.directory.publish_ca(self.ca_der, crl_der(self.db))
        return None

    def _record(self, group: list, now: datetime, *, note: str | None = None,
                error: AutoenrollError | None = None) -> None:
        """This target's state of the rows: done (with a note), or failed once more (with back-off)."""
        states = []
        for row in group:
            if error is None:
                states.append(dict(outbox_id=row.id, attempts=row.attempts, next_attempt_at=now, last_error=note,
                                   done_at=now))
            else:
                attempts = row.attempts + 1
                delay = backoff_delay(attempts, base=2.0, cap=MAX_BACKOFF, jitter=0.5)
                states.append(dict(outbox_id=row.id, attempts=attempts,
                                   next_attempt_at=now + timedelta(seconds=delay),
                                   last_error=str(error.detail)[:500], done_at=None))
        store.record_at_target(self.db, self.name, states)


def target_status(db: Database, name: str) -> dict:
    """Rows not yet done at target `name`, and how many of them failed at least once there."""
    return store.target_status(db, name)
