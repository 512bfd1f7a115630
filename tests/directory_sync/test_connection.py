"""The connection module against a real slapd: the one translator from python-ldap to the error tree."""

from __future__ import annotations

import ldap
import pytest

from directory_sync.connection import ConnectionPool
from directory_sync.slapd import free_port
from registration_app.core.errors import AutoenrollError, DirectoryUnavailable, UserNotFound

ALICE = "uid=alice,ou=people,dc=example,dc=org"


@pytest.fixture
def pool(slapd):
    if slapd.pid is None:
        slapd.start()
    p = ConnectionPool(slapd.settings())
    yield p
    p.close()


def test_a_refused_operation_is_directory_unavailable_and_the_connection_stays_pooled(pool):
    with pytest.raises(DirectoryUnavailable, match="refused the operation") as refused:
        pool.run(lambda conn: conn.modify_ext_s(ALICE, [(ldap.MOD_REPLACE, "userPassword", [b"owned"])]))
    assert refused.value.extra["ldap_result"] == "Insufficient access"
    assert pool.idle_connections == 1


def test_a_missing_entry_is_user_not_found(pool):
    with pytest.raises(UserNotFound):
        pool.run(lambda conn: conn.modify_ext_s("uid=gone,ou=people,dc=example,dc=org",
                                                [(ldap.MOD_ADD, "description", [b"x"])]))
    assert pool.read("uid=gone,ou=people,dc=example,dc=org", ["mail"]) is None
    assert list(pool.paged("ou=gone,dc=example,dc=org", "(mail=*)", ["mail"])) == []


def test_no_server_is_directory_unavailable_naming_the_client_error(slapd):
    pool = ConnectionPool(slapd.settings(url=f"ldap://127.0.0.1:{free_port()}"))
    with pytest.raises(DirectoryUnavailable) as down:
        pool.read(ALICE, ["mail"])
    assert down.value.extra == {"ldap_error": "SERVER_DOWN"}


def test_a_bad_call_of_ours_is_an_internal_error_not_a_directory_outage(pool):
    with pytest.raises(AutoenrollError) as bug:
        pool.run(lambda conn: conn.search_ext_s(ALICE, ldap.SCOPE_BASE, "(((", ["mail"]))
    assert type(bug.value) is AutoenrollError and bug.value.extra == {"ldap_error": "FILTER_ERROR"}


def test_entries_read_with_attribute_names_in_any_case(pool):
    attrs = pool.read(ALICE, ["MAIL", "memberOf"])
    assert attrs["mail"] == [b"alice@example.org"]
    assert b"cn=smime-users,ou=groups,dc=example,dc=org" in attrs["memberof"]


def test_a_paged_search_asks_for_the_next_page_early_and_stops_cleanly_when_left(pool):
    from directory_sync.connection import search_pages
    people = "ou=people,dc=example,dc=org"

    def pages(conn, keep: int | None) -> list[list[str]]:
        out = []
        for page in search_pages(conn, people, "(mail=*)", ["mail"], timeout=10, page_size=1):
            out.append([dn for dn, _ in page])
            if keep is not None and len(out) == keep:
                break  # the generator is closed here, with the next page already asked for
        return out

    every = pool.run(lambda conn: pages(conn, None))
    assert len(every) >= 2 and all(len(page) == 1 for page in every)
    assert pool.run(lambda conn: pages(conn, 1)) == every[:1]
    # the same connection, after a search left with a page outstanding, still answers
    assert pool.idle_connections == 1
    assert pool.run(lambda conn: pages(conn, None)) == every
