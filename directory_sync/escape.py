"""The escaping helpers: every LDAP filter value built from input goes through here; DNs go through
registration_app/core/dn.py (the one normaliser), group names through resolve_group_dn."""

from __future__ import annotations

from registration_app.core.dn import InvalidDn, group_dn
from registration_app.core.errors import BadRequest

# RFC 4515 section 3: these must be escaped in an assertion value.
_FILTER_SPECIAL = {0x00: "\\00", 0x28: "\\28", 0x29: "\\29", 0x2A: "\\2a", 0x5C: "\\5c"}


def filter_value(value: str) -> str:
    """Escape `value` for use as an assertion value in a search filter (RFC 4515).

    Written out instead of ldap3.utils.conv.escape_filter_chars so that the rule is visible here and
    does not depend on ldap3's encoding guesses.
    """
    return "".join(_FILTER_SPECIAL.get(ord(ch), ch) for ch in value)


def resolve_group_dn(group: str, groups_base: str) -> str:
    """The normalised DN of a group given as a DN or as a bare name (then directly under groups_base)."""
    try:
        return group_dn(group, groups_base)
    except InvalidDn as exc:
        raise BadRequest(f"{group[:200]!r} is not a group DN nor a group name") from exc


def check_email(email: str) -> str:
    """Refuse addresses that no mailbox has (control characters, no @, too long) before they reach LDAP."""
    if not isinstance(email, str) or not 3 <= len(email) <= 254 or "@" not in email:
        raise BadRequest("Not a valid email address")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in email):
        raise BadRequest("Not a valid email address")
    return email
