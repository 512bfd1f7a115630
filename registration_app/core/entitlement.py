"""Who may obtain a profile: one rule, a pure decision over the user's groups.

A profile names groups by DN, or by a bare name meaning the group with that cn directly under
`groups_base` and nowhere else (a group called "smime-users" in another branch of the tree entitles
nobody). The configuration is resolved once, at start-up (`resolve_profile_groups`): every profile then
holds normalised full DNs, and a user is entitled when one of the DNs of their groups, normalised the
same way (core/dn.py), is one of them. Issuance (invite, bootstrap, enroll), provisioning and reconcile
all decide with `is_entitled`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from .dn import InvalidDn, group_dn, normalise_group_dn
from .errors import ConfigError
from .model import Profile


def resolve_profile_groups(profiles: Mapping[str, Profile], groups_base: str) -> dict[str, Profile]:
    """Each profile with its groups as normalised full DNs; ConfigError naming the profile and the
    group when one is not a DN."""
    out = {}
    for name, profile in profiles.items():
        resolved = set()
        for group in profile.groups:
            try:
                resolved.add(group_dn(group, groups_base))
            except InvalidDn as exc:
                raise ConfigError(f"profile {name!r}: group {group!r} is not a distinguished name "
                                  f"(nor a bare name under groups_base {groups_base!r})") from exc
        out[name] = dataclasses.replace(profile, groups=frozenset(resolved))
    return out


def user_group_dns(user_groups: Iterable[str]) -> frozenset[str]:
    """The normalised DNs of a user's groups as the directory gave them; values that are not DNs
    (they cannot name a group) are dropped."""
    out = set()
    for group in user_groups:
        try:
            out.add(normalise_group_dn(group))
        except InvalidDn:
            continue
    return frozenset(out)


def is_entitled(profile: Profile, user_groups: Iterable[str]) -> bool:
    """True when one of the user's groups (DNs) is one of the profile's groups.

    The profile's groups must be resolved (`resolve_profile_groups`, done by load_settings): a bare
    name left in a profile matches nothing, since only the configuration knows groups_base.
    """
    wanted = {g for g in profile.groups if "=" in g}
    if not wanted:
        return False
    resolved = {normalise_group_dn(g) for g in wanted}
    return not resolved.isdisjoint(user_group_dns(user_groups))
