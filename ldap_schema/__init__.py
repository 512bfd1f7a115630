"""LDIF for the private slapd (cn=config bootstrap, base DIT, ACLs, demo users): data, shipped in the wheel
as this package so that `python -m directory_sync.slapd` finds it when installed (importlib.resources)."""
