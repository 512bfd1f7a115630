"""The one DN normaliser: every comparison of distinguished names (groups, members, users) goes through it.

RFC 4514 strings are parsed into RDNs and written back in one canonical form: attribute types and
values lower-cased (the attributes that name people and groups, cn, uid, ou, dc, o, match
case-insensitively), insignificant spaces dropped and inner runs of spaces collapsed (as caseIgnoreMatch
does), escapes reduced to the ones RFC 4514 requires, and the values of a multi-valued RDN sorted. Two
DNs name the same entry when their normal forms are equal, and a normal form is itself a valid DN.

Written with the standard library because the core imports no LDAP library; tests check it against
python-ldap's `ldap.dn.str2dn`.
"""

from __future__ import annotations

import re
from functools import lru_cache

# Characters that force the slow parser (escapes, quotes, multi-valued RDNs, hex values, old separators).
_SLOW = re.compile(r'[\\"+#;<>]')
_TYPE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)$")
_SPACES = re.compile(r"\s+")
_ESCAPE_ANYWHERE = frozenset(',+"\\<>;=\x00')
# A DN already in normal form once lower-cased: what slapd returns for nearly every entry and group.
_AVA = r'(?:[a-z][a-z0-9-]*|[0-9]+(?:\.[0-9]+)*)=[^\s,=+"\\<>;#](?:[^\s,=+"\\<>;]| (?=[^\s,]))*'
_NORMAL = re.compile(f"{_AVA}(?:,{_AVA})*")


class InvalidDn(ValueError):
    """Not an RFC 4514 distinguished name."""


def _fold(value: str) -> str:
    return _SPACES.sub(" ", value.strip()).lower()


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in _ESCAPE_ANYWHERE or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch if ch != "\x00" else "\\00")
        else:
            out.append(ch)
    return "".join(out)


def _attribute_type(text: str, dn: str) -> str:
    kind = text.strip()
    if kind[:4].lower() == "oid.":
        kind = kind[4:]
    if not _TYPE.match(kind):
        raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
    return kind.lower()


def _parse(dn: str) -> list[list[tuple[str, str]]]:
    """RDNs of a DN, each a list of (type, canonical value); the full RFC 4514 grammar."""
    rdns: list[list[tuple[str, str]]] = []
    avas: list[tuple[str, str]] = []
    i, n = 0, len(dn)
    while True:
        eq = dn.find("=", i)
        if eq < 0:
            raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
        kind = _attribute_type(dn[i:eq], dn)
        i = eq + 1
        while i < n and dn[i] == " ":
            i += 1
        chars: list[str] = []
        if i < n and dn[i] == "#":  # a BER value in hex: compared as its hex text
            j = i + 1
            while j < n and dn[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 1 or (j - i - 1) % 2:
                raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
            avas.append((kind, dn[i:j].lower()))
            i = j
        elif i < n and dn[i] == '"':  # RFC 2253 quoted value, still met in the wild
            j = i + 1
            while j < n and dn[j] != '"':
                if dn[j] == "\\":
                    j += 1
                chars.append(dn[j] if j < n else "")
                j += 1
            if j >= n:
                raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
            avas.append((kind, _canonical(_fold("".join(chars)), dn)))
            i = j + 1
        else:
            pending = bytearray()  # \XX escapes are UTF-8 bytes: decode runs of them together
            while i < n and dn[i] not in ",+;":
                ch = dn[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
                    pair = dn[i + 1:i + 3]
                    if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                        pending.append(int(pair, 16))
                        i += 3
                        continue
                    ch = dn[i + 1]
                    i += 1
                elif ch in '"<>':
                    raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
                if pending:
                    chars.append(_utf8(pending, dn))
                    pending.clear()
                chars.append(ch)
                i += 1
            if pending:
                chars.append(_utf8(pending, dn))
            # outer spaces, even escaped ones, are insignificant (RFC 4518)
            avas.append((kind, _canonical(_fold("".join(chars)), dn)))
        while i < n and dn[i] == " ":
            i += 1
        if i >= n:
            rdns.append(avas)
            return rdns
        if dn[i] == "+":
            i += 1
            continue
        if dn[i] not in ",;":
            raise InvalidDn(f"not a distinguished name: {dn[:200]!r}")
        rdns.append(avas)
        avas = []
        i += 1


def _canonical(value: str, dn: str) -> str:
    if not value:
        raise InvalidDn(f"not a distinguished name (an empty value): {dn[:200]!r}")
    return _escape(value)


def _utf8(raw: bytearray, dn: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDn(f"not a distinguished name (bad UTF-8 escape): {dn[:200]!r}") from exc


def normalise_dn(dn: str) -> str:
    """The canonical form of `dn` (see the module's docstring); InvalidDn if it is not a DN."""
    if not isinstance(dn, str) or not dn.strip():
        raise InvalidDn(f"not a distinguished name: {str(dn)[:200]!r}")
    lowered = dn.lower()
    if _NORMAL.fullmatch(lowered):  # the common case, 100,000 times in a reconcile pass
        return lowered
    if _SLOW.search(dn) is None:
        out = []
        for part in dn.split(","):
            kind, eq, value = part.partition("=")
            value = _fold(value)
            if not eq or not value or "=" in value:
                break  # an error, or an "=" inside a value (legal): the full parser decides
            out.append(f"{_attribute_type(kind, dn)}={value}")
        else:
            return ",".join(out)
    return ",".join("+".join(f"{kind}={value}" for kind, value in sorted(rdn)) for rdn in _parse(dn))


@lru_cache(maxsize=4096)
def normalise_group_dn(dn: str) -> str:
    """normalise_dn, remembered: a directory has a handful of groups shared by every user."""
    return normalise_dn(dn)


def is_bare_name(group: str) -> bool:
    """A group named by its cn alone ("smime-users"), not by a DN."""
    return "=" not in group


def group_dn(group: str, groups_base: str) -> str:
    """The normalised DN of a group given as a DN, or as a bare name: then the group directly under
    `groups_base` with that cn, and nowhere else."""
    if is_bare_name(group):
        if not group.strip():
            raise InvalidDn("an empty group name")
        return normalise_dn(f"cn={_escape(group.strip())},{groups_base}")
    return normalise_dn(group)


def dn_key(dn: str) -> str:
    """normalise_dn for DNs read back from LDAP or the database, never raising: a value that is not a
    DN (it names no entry) gets a form that equals no normal form."""
    try:
        return normalise_dn(dn)
    except InvalidDn:
        return "!" + str(dn)
