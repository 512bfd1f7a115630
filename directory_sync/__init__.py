"""Everything that talks LDAP: settings, the directory adapter, and a private slapd for dev and tests.

Public surface: `LdapSettings`, `LdapDirectory` (ldap.py), `PrivateSlapd` (slapd.py).
"""

from directory_sync.config import LdapSettings

__all__ = ["LdapSettings"]
