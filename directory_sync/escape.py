"""The escaping helpers, on python-ldap's own: every LDAP filter value built from input goes through
`filter_value`, every DN value through `dn_value` / `first_rdn`; DNs are compared through
registration_app/core/dn.py (the one normaliser), group names resolved through resolve_group_dn."""

from __future__ import annotations

from datetime import datetime, timezone

import ldap.dn
import ldap.filter

from registration_app.core.dn import InvalidDn, group_dn
from registration_app.core.errors import BadRequest


def filter_value(value: str) -> str:
    """Escape `value` for use as an assertion value in a search filter (RFC 4515 section 3:
    NUL, `(`, `)`, `*` and `\\` become \\00, \\28, \\29, \\2a and \\5c)."""
    return ldap.filter.escape_filter_chars(value)


def dn_value(value: str) -> str:
    """Escape `value` for use as an attribute value in a DN (RFC 4514)."""
    return ldap.dn.escape_dn_chars(value)


def first_rdn(dn: str) -> tuple[str, str]:
    """The attribute and (unescaped) value of the first RDN of `dn`: ("cn", "Autoenroll CA") for
    "cn=Autoenroll CA,ou=services,...". BadRequest if `dn` is not a DN."""
    try:
        attribute, value, _ = ldap.dn.str2dn(dn)[0][0]
        return attribute, value
    except (ldap.DECODING_ERROR, IndexError) as exc:
        raise BadRequest(f"{dn[:200]!r} is not a distinguished name") from exc


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


def generalized_time(when: datetime) -> str:
    """A filter value for a GeneralizedTime attribute (modifyTimestamp, whenChanged), in UTC. With the
    fraction ".0": Active Directory (Samba at least) matches `YYYYMMDDHHMMSSZ` against every entry, and
    OpenLDAP takes either form."""
    return when.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S.0Z")
