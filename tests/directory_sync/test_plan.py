"""The publication planner, without I/O: the order mail clients need, and a modify that gets there the way
OpenLDAP applies it (deletes by value, then appends in order)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from directory_sync.plan import Plan, Wanted, plan_publication, plan_values, wanted_values
from registration_app.core.model import KeyType, Profile, Usage

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
PROFILES = {"enc": Profile(name="enc", usage=Usage.ENCRYPTION, key_type=KeyType.RSA_3072, keep_superseded=True),
            "enc-ec": Profile(name="enc-ec", usage=Usage.ENCRYPTION, key_type=KeyType.EC_P256),
            "enc-strict": Profile(name="enc-strict", usage=Usage.ENCRYPTION),
            "sig": Profile(name="sig", usage=Usage.SIGNATURE)}


@dataclass(frozen=True)
class Row:
    der: bytes
    status: str = "valid"
    profile: str = "enc"
    usage: str = "encryption"
    not_after: datetime = NOW + timedelta(days=300)
    issued_at: datetime = NOW - timedelta(days=1)


def applied(current: list[bytes], plan: Plan) -> list[bytes]:
    """What OpenLDAP makes of one modify: the values deleted, then the added ones appended in order."""
    assert set(plan.deletes) <= set(current) and not set(plan.adds) & (set(current) - set(plan.deletes))
    return [v for v in current if v not in plan.deletes] + list(plan.adds)


def test_current_encryption_certificate_first_then_others_then_signature():
    enc = Row(b"enc")
    old_enc = Row(b"old-enc", status="superseded", issued_at=NOW - timedelta(days=200))  # kept by its profile
    sig = Row(b"sig", profile="sig", usage="signature")
    plan = plan_publication([b"foreign-1", sig.der, b"foreign-2"], [old_enc, sig, enc], profiles=PROFILES, now=NOW)
    assert plan.target == (b"enc", b"old-enc", b"foreign-1", b"foreign-2", b"sig")
    assert applied([b"foreign-1", b"sig", b"foreign-2"], plan) == list(plan.target)


def test_an_rsa_encryption_certificate_comes_before_a_newer_ec_one():
    """Every client encrypts to RSA keys, not every one to EC keys (gpgsm 2.2 cannot)."""
    rsa, ec = Row(b"rsa", issued_at=NOW - timedelta(days=9)), Row(b"ec", profile="enc-ec")
    assert wanted_values([ec, rsa], PROFILES, NOW).first == (b"rsa", b"ec")
    assert wanted_values([ec], PROFILES, NOW).first == (b"ec",)


def test_what_is_not_shown_is_removed_and_others_values_stay():
    revoked, expired = Row(b"revoked", status="revoked"), Row(b"expired", not_after=NOW - timedelta(days=1))
    superseded = Row(b"superseded", profile="enc-strict", status="superseded")
    wanted = wanted_values([revoked, expired, superseded, Row(b"enc")], PROFILES, NOW, strays=[b"someone-elses"])
    assert wanted == Wanted(first=(b"enc",), remove=frozenset({b"revoked", b"expired", b"superseded",
                                                                 b"someone-elses"}))
    current = [b"foreign", b"revoked", b"someone-elses", b"enc", b"superseded"]
    assert applied(current, plan_values(current, wanted)) == [b"enc", b"foreign"]


def test_only_what_must_move_is_deleted_and_added():
    wanted = Wanted(first=(b"enc",), last=(b"new-sig",), remove=frozenset({b"sig"}))
    plan = plan_values([b"enc", b"foreign", b"sig"], wanted)
    assert (plan.deletes, plan.adds) == ((b"sig",), (b"new-sig",))  # enc and foreign stay where they are
    assert not plan_values(list(plan.target), wanted).changes  # in line: no modify at all
    moved = plan_values([b"foreign", b"enc"], Wanted(first=(b"enc",)))
    assert (moved.deletes, moved.adds) == ((b"foreign", b"enc"), (b"enc", b"foreign"))  # re-added, same bytes


def test_a_user_with_only_our_signature_certificate_keeps_a_partners_encryption_certificate_first():
    plan = plan_publication([b"partner-enc"], [Row(b"sig", profile="sig", usage="signature")], profiles=PROFILES, now=NOW)
    assert plan.target == (b"partner-enc", b"sig") and (plan.deletes, plan.adds) == ((), (b"sig",))


values = st.lists(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]), unique=True)


@given(current=values, first=values, last=values, remove=values)
def test_any_entry_ends_as_planned_in_one_modify(current, first, last, remove):
    last = [v for v in last if v not in first]
    wanted = Wanted(first=tuple(first), last=tuple(last), remove=frozenset(remove) - {*first, *last})
    plan = plan_values(current, wanted)
    result = applied(current, plan)
    assert result == list(plan.target)
    others = [v for v in current if v not in {*first, *last} and v not in wanted.remove]
    assert result == [*first, *others, *last]  # ours first, the others in their order, then our signature ones
    assert not plan_values(result, wanted).changes
