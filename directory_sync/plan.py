"""The publication planner: what a user's userCertificate;binary must hold, and the one modify that
gets it there. Pure functions of (the entry's current values, our records for the user, now): the
publisher, reconcile, bulk publication and provisioning all plan with them, so they agree.

Order of the values (DESIGN "Directory publication"; shared/FACTS.md: GnuPG's dirmngr passes on only
the first value of the attribute):

1. our encryption certificates that are shown, valid before kept superseded ones, RSA keys before EC
   ones (every client encrypts to RSA; gpgsm 2.2, for one, cannot encrypt to EC keys), newest first:
   the user's current encryption certificate is the attribute's first value;
2. every other value (other issuers', and any value our records for this user do not know), in the
   order it had, byte for byte;
3. our other certificates that are shown (signature), valid first, newest first. They come after the
   others' values so that a user with only our signature certificate keeps a partner's encryption
   certificate first.

Our values that must not be shown (revoked, expired, superseded unless the profile keeps them, and
values of ours the caller knows belong to another user) are removed.

OpenLDAP keeps values in the order they were added, and a modify can only delete values and append
new ones. So the plan keeps the longest run of values already in place at the front, and deletes
and re-adds the rest in one modify: a value that moves is re-added with the bytes that were read,
so other issuers' values stay byte-identical (they may move behind ours). Deleting by value also
makes the modify fail as a whole if another writer removed one of those values meanwhile; the
caller reads again (and asserts the entry's entryCSN where it knows it, see ldap.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from registration_app.core.model import Profile, Wanted  # Wanted: the Directory Protocol names it (core/ports.py)


@dataclass(frozen=True)
class Plan:
    """The values the entry must end with (in order) and the one modify: delete, then add in order."""

    target: tuple[bytes, ...]
    deletes: tuple[bytes, ...]
    adds: tuple[bytes, ...]

    @property
    def changes(self) -> bool:
        return bool(self.deletes or self.adds)


def wanted_values(records: Iterable, profiles: dict[str, Profile], now: datetime, *,
                  strays: Iterable[bytes] = ()) -> Wanted:
    """Our values for one user from our records (rows with der, status, usage, profile, not_after,
    issued_at). `strays`: values of ours found in the entry that belong to someone else (removed)."""
    records = list(records)

    def shown(r) -> bool:
        if r.not_after <= now:
            return False
        if r.status == "valid":
            return True
        profile = profiles.get(r.profile)
        return r.status == "superseded" and profile is not None and profile.keep_superseded

    def elliptic(r) -> bool:  # by the profile's key type: no certificate to parse per row
        profile = profiles.get(r.profile)
        return profile is not None and not profile.key_type.is_rsa

    keep = sorted((r for r in records if shown(r)),
                  key=lambda r: (r.status != "valid", elliptic(r), -r.issued_at.timestamp()))
    first = tuple(r.der for r in keep if r.usage == "encryption")
    last = tuple(r.der for r in keep if r.usage != "encryption")
    visible = {*first, *last}
    remove = frozenset({r.der for r in records if not shown(r)} | set(strays)) - visible
    return Wanted(first=first, last=last, remove=remove)


def plan_values(current: Sequence[bytes], wanted: Wanted) -> Plan:
    """The entry's target values and the modify from `current` (as read) to them."""
    current = list(dict.fromkeys(current))
    ours = set(wanted.shown)
    others = [v for v in current if v not in ours and v not in wanted.remove]
    target = tuple(dict.fromkeys([*wanted.first, *others, *wanted.last]))
    targeted = set(target)
    kept = [v for v in current if v in targeted]  # what stays after the removals, in its order
    same = 0
    while same < len(kept) and kept[same] == target[same]:
        same += 1
    deletes = tuple(v for v in current if v not in targeted) + tuple(kept[same:])
    return Plan(target=target, deletes=deletes, adds=target[same:])


def plan_publication(current: Sequence[bytes], records: Iterable, *, profiles: dict[str, Profile],
                     now: datetime, strays: Iterable[bytes] = ()) -> Plan:
    """`plan_values(current, wanted_values(records, ...))`: the whole decision for one entry."""
    return plan_values(current, wanted_values(records, profiles, now, strays=strays))
