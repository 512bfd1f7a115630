"""Everything that talks LDAP, on one client library (python-ldap): settings and the attribute map
(config.py), connections, their pool and the one error translator (connection.py), the directory
adapter (ldap.py), bulk scans and publication (bulk.py), and a private slapd for dev and tests.

Public surface: `LdapSettings`, `AttributeMap`, `LdapDirectory` (ldap.py), `PrivateSlapd` (slapd.py).
"""

from directory_sync.config import AttributeMap, LdapSettings

__all__ = ["AttributeMap", "LdapSettings"]
