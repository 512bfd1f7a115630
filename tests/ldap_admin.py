"""A small python-ldap client for arranging test data (as cn=admin, or any account), with the few
operations the tests use.

Each operation returns True on success and False when the server refused it, with the server's answer
in `result` ({"result": code, "description": RFC 4511 name}), so that a test can write
`assert admin.modify(dn, {"mail": [(MODIFY_REPLACE, [email])]}), admin.result`. A search leaves its
entries in `response`: [{"dn", "raw_attributes": {name: [bytes]}, "attributes": {name: [str]}}].
Values may be given as str (UTF-8) or bytes; a single value needs no list.
"""

from __future__ import annotations

from collections.abc import Iterable

import ldap
from ldap.controls import LDAPControl

MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE = "MODIFY_ADD", "MODIFY_DELETE", "MODIFY_REPLACE"
BASE, LEVEL, SUBTREE = "BASE", "LEVEL", "SUBTREE"

_OPERATIONS = {MODIFY_ADD: ldap.MOD_ADD, MODIFY_DELETE: ldap.MOD_DELETE, MODIFY_REPLACE: ldap.MOD_REPLACE}
_SCOPES = {BASE: ldap.SCOPE_BASE, LEVEL: ldap.SCOPE_ONELEVEL, SUBTREE: ldap.SCOPE_SUBTREE}
# RFC 4511 section 4.1.9 names of the result codes tests meet.
_NAMES = {0: "success", 4: "sizeLimitExceeded", 10: "referral", 16: "noSuchAttribute", 17: "undefinedAttributeType",
          19: "constraintViolation", 20: "attributeOrValueExists", 21: "invalidAttributeSyntax", 32: "noSuchObject",
          34: "invalidDNSyntax", 49: "invalidCredentials", 50: "insufficientAccessRights", 53: "unwillingToPerform",
          64: "namingViolation", 65: "objectClassViolation", 66: "notAllowedOnNonLeaf", 67: "notAllowedOnRDN",
          68: "entryAlreadyExists", 69: "objectClassModsProhibited"}


class Attributes(dict):
    """An entry's attributes by name, looked up in any case (as LDAP names compare)."""

    def __getitem__(self, name: str):
        for key in self:
            if key.lower() == name.lower():
                return super().__getitem__(key)
        raise KeyError(name)

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(key.lower() == name.lower() for key in self)


class LdapAdmin:
    """A connection bound as `dn` (cn=admin, the rootdn, bypasses ACLs)."""

    def __init__(self, url: str, dn: str, password: str, *, ca_file: str | None = None) -> None:
        """`ca_file`: verify an ldaps:// server against this CA (and its name), for this connection only."""
        self.conn = ldap.initialize(url)
        self.conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        self.conn.set_option(ldap.OPT_REFERRALS, 0)
        if ca_file is not None:
            self.conn.set_option(ldap.OPT_X_TLS_CACERTFILE, ca_file)
            self.conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            self.conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        self.conn.simple_bind_s(dn, password)
        self.result: dict = {}
        self.response: list[dict] = []

    @classmethod
    def for_slapd(cls, slapd) -> LdapAdmin:
        """cn=admin of a tests' PrivateSlapd."""
        return cls(slapd.url, slapd.admin_dn, slapd.admin_password)

    def add(self, dn: str, object_classes: str | Iterable[str], attributes: dict | None = None) -> bool:
        entry = {"objectClass": _values(object_classes), **{k: _values(v) for k, v in (attributes or {}).items()}}
        return self._do(lambda: self.conn.add_ext_s(dn, list(entry.items())))

    def modify(self, dn: str, changes: dict[str, list[tuple]]) -> bool:
        """`changes`: {attribute: [(MODIFY_ADD | MODIFY_DELETE | MODIFY_REPLACE, values), ...]};
        MODIFY_DELETE with no values removes the whole attribute."""
        modlist = [(_OPERATIONS[operation], attribute, _values(vals) or None)
                   for attribute, operations in changes.items() for operation, vals in operations]
        return self._do(lambda: self.conn.modify_ext_s(dn, modlist))

    def delete(self, dn: str, controls: list[tuple] | None = None) -> bool:
        """`controls`: [(oid, criticality, value bytes or None)], e.g. ManageDsaIT to delete a referral."""
        serverctrls = [LDAPControl(oid, critical, value) for oid, critical, value in controls or ()]
        return self._do(lambda: self.conn.delete_ext_s(dn, serverctrls=serverctrls or None))

    def modify_dn(self, dn: str, new_rdn: str, new_superior: str | None = None) -> bool:
        return self._do(lambda: self.conn.rename_s(dn, new_rdn, new_superior, delold=1))

    def search(self, base: str, flt: str, search_scope: str = SUBTREE, attributes: list[str] | None = None) -> bool:
        """Entries into `response`; True if the search succeeded (an empty result included)."""
        self.response = []

        def search() -> None:
            found = self.conn.search_ext_s(base, _SCOPES[search_scope], flt, attributes)
            self.response = [{"dn": dn, "raw_attributes": Attributes(attrs),
                              "attributes": Attributes({k: [v.decode("utf-8", "replace") for v in vals]
                                                        for k, vals in attrs.items()})}
                             for dn, attrs in found if dn is not None]

        return self._do(search)

    def values(self, dn: str, attribute: str) -> list[bytes]:
        """The raw values of one attribute of `dn` (empty if it has none); fails the test if `dn` is missing."""
        assert self.search(dn, "(objectClass=*)", BASE, [attribute]), self.result
        return list(self.response[0]["raw_attributes"].get(attribute, []))

    def unbind(self) -> None:
        try:
            self.conn.unbind_ext_s()
        except ldap.LDAPError:
            pass

    def __enter__(self) -> LdapAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.unbind()

    def _do(self, operation) -> bool:
        try:
            operation()
        except ldap.LDAPError as exc:
            code = getattr(exc, "errnum", None)
            if not isinstance(code, int) or code < 0:
                raise  # no answer from the server: not a refusal a test could expect
            info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            self.result = {"result": code, "description": _NAMES.get(code, info.get("desc", str(code))),
                           "message": info.get("info", "")}
            return False
        self.result = {"result": 0, "description": "success", "message": ""}
        return True


def _values(value) -> list[bytes]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    return [v if isinstance(v, bytes) else str(v).encode() for v in value]
