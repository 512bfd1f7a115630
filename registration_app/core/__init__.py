"""Pure domain: no Flask, no SQLAlchemy, no ldap3 (STYLE.md)."""
