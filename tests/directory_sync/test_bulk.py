"""BulkDirectory against a real slapd: pipelined publication, one outcome per entry."""

from __future__ import annotations

import pytest

from directory_sync.bulk import BulkDirectory
from directory_sync.plan import Wanted
from registration_app.core.errors import DirectoryUnavailable, UserNotFound
from tests.directory_sync.certs import cert

ISSUER = "Bulk Test CA"


def ours(*encryption: bytes) -> Wanted:
    return Wanted(first=encryption)


def certificates(directory, email: str) -> list[bytes]:
    return list(directory.find_user(email).certificates)


@pytest.mark.parametrize("transactions", [True, False], ids=["in transactions", "pipelined"])
def test_many_entries_are_published_with_one_outcome_each(directory, new_user, transactions):
    users = [new_user() for _ in range(7)]
    values = [cert(ISSUER, email, encryption=True) for _, email in users]
    with BulkDirectory(directory, transactions=transactions) as bulk:
        outcomes = bulk.publish_many([(dn, [], ours(value)) for (dn, _), value in zip(users, values)], window=3)
    assert outcomes == [None] * len(users)
    for (_, email), value in zip(users, values):
        assert certificates(directory, email) == [value]


@pytest.mark.parametrize("transactions", [True, False], ids=["in a transaction", "pipelined"])
def test_a_refused_modify_costs_only_its_entry(directory, new_user, transactions):
    """In a transaction, one refusal undoes them all: the entries are then published one by one."""
    (dn1, email1), (dn2, email2) = new_user(), new_user()
    already = cert(ISSUER, email2, encryption=True, age_days=3)
    with BulkDirectory(directory, transactions=transactions) as bulk:
        bulk.publish(dn2, [], ours(already))
        new1, new2 = cert(ISSUER, email1, encryption=True), cert(ISSUER, email2, encryption=True)
        gone = "uid=nobody-here,ou=people,dc=example,dc=org"
        # dn2 as if read before `already` was written: the modify fails, the entry is read again.
        outcomes = bulk.publish_many([(dn1, [], ours(new1)), (gone, [], ours(new1)), (dn2, [], ours(new2, already))])
    assert outcomes[0] is None and isinstance(outcomes[1], UserNotFound) and outcomes[2] is None
    assert certificates(directory, email1) == [new1]
    assert certificates(directory, email2) == [new2, already]


def test_nothing_to_do_sends_nothing(directory, new_user):
    dn, email = new_user()
    value = cert(ISSUER, email, encryption=True)
    with BulkDirectory(directory) as bulk:
        assert bulk.publish_many([(dn, [value], ours(value))]) == [None]
    assert certificates(directory, email) == []  # `current` said it was there: no modify was sent


def test_no_directory_fails_every_entry(slapd, directory, new_user):
    dn, email = new_user()
    slapd.kill()
    try:
        with BulkDirectory(directory) as bulk:
            outcomes = bulk.publish_many([(dn, [], ours(cert(ISSUER, email, encryption=True)))] * 3)
    finally:
        slapd.start()
    assert all(isinstance(o, DirectoryUnavailable) for o in outcomes)


@pytest.mark.parametrize("setting", [True, False], ids=["bulk_transactions on", "bulk_transactions off"])
def test_the_setting_decides_whether_bulk_publication_opens_transactions(directory, new_user, monkeypatch, setting):
    import dataclasses

    from directory_sync import bulk as bulk_module
    from directory_sync.ldap import LdapDirectory

    started = []
    real_start = bulk_module.ldap_txn.start
    monkeypatch.setattr(bulk_module.ldap_txn, "start", lambda conn: started.append(1) or real_start(conn))
    configured = LdapDirectory(dataclasses.replace(directory.settings, bulk_transactions=setting))
    users = [new_user() for _ in range(3)]
    values = [cert(ISSUER, email, encryption=True) for _, email in users]
    with BulkDirectory(configured) as bulk:
        assert bulk.publish_many([(dn, [], ours(v)) for (dn, _), v in zip(users, values)]) == [None] * 3
    assert bool(started) is setting  # the real slapd offers transactions: only the setting says no
    for (_, email), value in zip(users, values):
        assert certificates(directory, email) == [value]
