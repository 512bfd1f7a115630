"""Who may obtain a profile: a pure decision over the user's groups."""

from __future__ import annotations

from .model import Profile


def _cn_of(dn: str) -> str:
    first = dn.split(",", 1)[0]
    return first.split("=", 1)[1].strip().lower() if "=" in first else first.strip().lower()


def is_entitled(profile: Profile, user_groups: frozenset[str]) -> bool:
    """A profile group is either a full DN or a bare cn; DNs compare case-insensitively."""
    dns = {g.replace(" ", "").lower() for g in user_groups}
    cns = {_cn_of(g) for g in user_groups}
    for wanted in profile.groups:
        if "=" in wanted:
            if wanted.replace(" ", "").lower() in dns:
                return True
        elif wanted.lower() in cns:
            return True
    return False
