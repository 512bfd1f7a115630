"""The escaping helpers: every LDAP filter value and DN part built from input goes through here."""

from __future__ import annotations

from ldap3.utils.dn import escape_rdn, parse_dn

from registration_app.core.errors import BadRequest

# RFC 4515 section 3: these must be escaped in an assertion value.
_FILTER_SPECIAL = {0x00: "\\00", 0x28: "\\28", 0x29: "\\29", 0x2A: "\\2a", 0x5C: "\\5c"}


def filter_value(value: str) -> str:
    """Escape `value` for use as an assertion value in a search filter (RFC 4515).

    Written out instead of ldap3.utils.conv.escape_filter_chars so that the rule is visible here and
    does not depend on ldap3's encoding guesses.
    """
    return "".join(_FILTER_SPECIAL.get(ord(ch), ch) for ch in value)


def rdn_value(value: str) -> str:
    """Escape one attribute value for use inside a DN (RFC 4514)."""
    return escape_rdn(value)


def normalise_dn(dn: str) -> str:
    """A comparable form of a DN: attribute names and values lower-cased, no spaces around separators.

    Good for the case-insensitive attributes that name people and groups (cn, uid, ou, dc).
    """
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except Exception as exc:  # ldap3 raises LDAPInvalidDnError, and sometimes plain errors
        raise BadRequest("Not a valid distinguished name") from exc
    out = []
    for attr, value, sep in parts:
        out.append(f"{attr.strip().lower()}={value.strip().lower()}{sep}")
    return "".join(out)


def check_email(email: str) -> str:
    """Refuse addresses that no mailbox has (control characters, no @, too long) before they reach LDAP."""
    if not isinstance(email, str) or not 3 <= len(email) <= 254 or "@" not in email:
        raise BadRequest("Not a valid email address")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in email):
        raise BadRequest("Not a valid email address")
    return email
