"""Bad answers from a real directory (sizeLimitExceeded, a referral, no answer at all, a refused bind):
each is a 503 DirectoryUnavailable whose message says what the directory did, never an internal error
(a value too large is test_schema_gaps.py's)."""

from __future__ import annotations

import socket

import ldap
import pytest

from directory_sync.connection import ConnectionPool
from directory_sync.ldap import LdapDirectory
from directory_sync.slapd import free_port
from registration_app.core.errors import DirectoryUnavailable
from registration_app.core.model import Wanted
from registration_app.web.status import status_of

PEOPLE = "ou=people,dc=example,dc=org"
MANAGE_DSA_IT = ("2.16.840.1.113730.3.4.2", True, None)


@pytest.fixture
def pool(slapd):
    p = ConnectionPool(slapd.settings())
    yield p
    p.close()


@pytest.fixture
def black_hole():
    """A TCP port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"ldap://127.0.0.1:{server.getsockname()[1]}"


def assert_unavailable(error: pytest.ExceptionInfo, says: str) -> None:
    assert type(error.value) is DirectoryUnavailable and status_of(error.value) == 503
    assert says in error.value.detail


def test_a_size_limit_is_named_with_what_to_change(pool):
    with pytest.raises(DirectoryUnavailable) as limited:
        pool.run(lambda conn: conn.search_ext_s(PEOPLE, ldap.SCOPE_SUBTREE, "(mail=*)", ["mail"], sizelimit=1))
    assert_unavailable(limited, "size limit cut the search short")
    assert pool.idle_connections == 1  # the server answered: the connection stays pooled


def test_a_referral_is_named_with_where_it_points_and_not_followed(slapd, ldap_admin):
    referral = "ou=moved,dc=example,dc=org"
    assert ldap_admin.add(referral, ["referral", "extensibleObject"],
                          {"ou": "moved", "ref": f"ldap://ldap.elsewhere.example/{referral}"}), ldap_admin.result
    directory = LdapDirectory(slapd.settings(users_base=referral))
    try:
        with pytest.raises(DirectoryUnavailable) as referred:
            directory.find_user("someone@example.org")
        assert_unavailable(referred, "answered with a referral to ldap://ldap.elsewhere.example/")
        with pytest.raises(DirectoryUnavailable) as referred_write:
            directory.publish(f"uid=x,{referral}", Wanted(first=(b"\x30\x03\x02\x01\x01",)))
        assert_unavailable(referred_write, "referrals are not followed")
    finally:
        directory.close()
        assert ldap_admin.delete(referral, controls=[MANAGE_DSA_IT]), ldap_admin.result


def test_a_directory_that_never_answers_is_a_timeout(slapd, black_hole):
    directory = LdapDirectory(slapd.settings(url=black_hole, timeout_seconds=0.5))
    try:
        with pytest.raises(DirectoryUnavailable) as silent:
            directory.find_user("alice@example.org")
    finally:
        directory.close()
    assert_unavailable(silent, "did not answer within timeout_seconds")


def test_a_refused_bind_is_named(slapd):
    directory = LdapDirectory(slapd.settings(password="not-the-password"))
    try:
        with pytest.raises(DirectoryUnavailable) as refused:
            directory.find_user("alice@example.org")
    finally:
        directory.close()
    assert_unavailable(refused, "refused the service account's bind")


def test_a_server_that_is_gone_is_unavailable_not_an_error_of_ours(slapd):
    directory = LdapDirectory(slapd.settings(url=f"ldap://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(DirectoryUnavailable):
            directory.find_user("alice@example.org")
    finally:
        directory.close()
