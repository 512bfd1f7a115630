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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from directory_sync.config import LdapSettings
from directory_sync.ldap import LdapDirectory
from directory_sync.plan import wanted_values
from registration_app.core.errors import AutoenrollError, SchemaRefused, UserNotFound
from registration_app.core.model import Profile
from registration_app.core.retry import backoff_delay
from registration_app.store import audit
from registration_app.store import targets as store
from registration_app.store.db import Database
from registration_app.store.outbox import crl_der, planned_rows_of

log = logging.getLogger("autoenroll.targets")

MAX_BACKOFF = 300.0
NOT_IN_TARGET = "not in this target"  # the target has no entry with the address: nothing to publish there


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
        return done

    def status(self) -> dict:
        return target_status(self.db, self.name)

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
