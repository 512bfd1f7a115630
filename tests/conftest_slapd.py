"""A real slapd for the tests (no LDAP mocks), built from ldap_schema/ like `make run`.

Use from tests/conftest.py:  from tests.conftest_slapd import *
"""

from __future__ import annotations

import uuid

import pytest

from directory_sync.ldap import LdapDirectory
from directory_sync.slapd import PrivateSlapd
from tests.ldap_admin import MODIFY_ADD, LdapAdmin
from bench.ldap_tls import issue_ldap_tls

__all__ = ["ldap_tls", "slapd", "directory", "ldap_admin", "new_user"]


@pytest.fixture(scope="session")
def ldap_tls(tmp_path_factory):
    """The TLS material of the session's slapd (bench/ldap_tls.py): its CA, certificate, a client certificate."""
    return issue_ldap_tls(tmp_path_factory.mktemp("ldap-tls"))


@pytest.fixture(scope="session")
def slapd(tmp_path_factory, ldap_tls):
    """One private slapd with base + demo entries for the whole session (started in ~0.3 s): ldap:// with
    StartTLS on `url`, ldaps:// on `ldaps_url`, with a certificate the test issued (`ldap_tls`)."""
    instance = PrivateSlapd(tmp_path_factory.mktemp("slapd"), tls=ldap_tls.slapd)
    instance.start()
    instance.load_demo()
    yield instance
    instance.stop()


@pytest.fixture
def directory(slapd):
    """An LdapDirectory bound as the service account. If a test killed slapd, it is started again."""
    if slapd.pid is None:
        slapd.start()
    d = LdapDirectory(slapd.settings())
    yield d
    d.close()


@pytest.fixture
def ldap_admin(slapd):
    """A connection as cn=admin (the rootdn: bypasses ACLs), for arranging test data (tests/ldap_admin.py)."""
    if slapd.pid is None:
        slapd.start()
    conn = LdapAdmin.for_slapd(slapd)
    yield conn
    conn.unbind()


@pytest.fixture
def new_user(ldap_admin):
    """Make a fresh user entry (so that tests which publish do not see each other's values).

    Returns a function: new_user(groups=("smime-users",)) -> (dn, email).
    """

    def make(groups: tuple[str, ...] = ()) -> tuple[str, str]:
        uid = "t-" + uuid.uuid4().hex[:12]
        dn, email = f"uid={uid},ou=people,dc=example,dc=org", f"{uid}@example.org"
        ok = ldap_admin.add(dn, ["inetOrgPerson", "pkiUser"],
                            {"uid": uid, "cn": f"Test {uid}", "sn": "Test", "mail": email, "userPassword": "pw"})
        assert ok, ldap_admin.result
        for group in groups:
            group_dn = f"cn={group},ou=groups,dc=example,dc=org"
            assert ldap_admin.modify(group_dn, {"member": [(MODIFY_ADD, [dn])]}), ldap_admin.result
        return dn, email

    return make
