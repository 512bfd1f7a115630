"""Pure domain: no Flask, no SQLAlchemy, no LDAP library (STYLE.md)."""
