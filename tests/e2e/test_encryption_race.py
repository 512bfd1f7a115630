"""The rule "one current encryption certificate per user" is checked outside the issuing transaction
(ra/authority.py `_replacement_of` and `_other_encryption` read the history through their own reads;
the key authority's transaction re-checks nothing but the renewal_key unique constraint). Two
enrollments of one user, each to its own real server (gunicorn, one worker) on one data folder and one
SQLite file, are held at the writer lock (the flock every writer of the file takes before BEGIN
IMMEDIATE) until both wait there, so both have passed the policy check before either commits:

- for the same profile, both carry the same renewal_key (email | profile | after:none | entry): the
  second insert breaks the constraint and is answered 409, so one certificate is issued;
- for two encryption profiles (smime-encryption and smime-encryption-ec, neither `coexist`), the keys
  differ, and the one-current-encryption index (store/models.py `encryption_slot`, unique among valid rows)
  decides: the second to commit is answered 409, nothing of it issued or escrowed; its retry with
  `replace` supersedes the winner's certificate, as a sequential request would.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from registration_app.agent import actions
from registration_app.agent.client import AgentConfig, AgentError, RegistrationClient
from registration_app.agent.store import AgentStore
from registration_app.settings import load_settings
from registration_app.store.db import Database
from registration_app.store.models import Escrow
from registration_app.store.repos import certificate_history, outbox_status
from bench.platform import SUITE_SETTINGS, ServerPlatform, eventually, make_platform
from directory_sync.slapd import free_port

pytestmark = pytest.mark.sqlite_only  # the writer lock held here is SQLite's flock

ENCRYPTION = ("smime-encryption", "smime-encryption-ec")


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, slapd):
    """Two `autoenroll serve` (one worker each) on one data folder: each request has a process of its
    own, so each waits at the file's flock, where /proc/locks shows it."""
    first = make_platform(tmp_path_factory.mktemp("race"), slapd.url, **SUITE_SETTINGS)
    port, http_port = free_port(), free_port()
    text = first.config.read_text()
    for key, value in (("public_url", f"https://localhost:{port}"), ("bind", f"127.0.0.1:{port}"),
                       ("http_bind", f"127.0.0.1:{http_port}")):
        text = re.sub(rf'^{key} = ".*"$', f'{key} = "{value}"', text, count=1, flags=re.M)
    second_config = first.data / "second.toml"
    second_config.write_text(text)
    second = ServerPlatform(data=first.data, config=second_config, url=f"https://localhost:{port}",
                            http_url=first.http_url, ldap_url=first.ldap_url)
    try:
        first.start(workers=1)
        second.start(workers=1)
        yield first, second
    finally:
        first.stop()
        second.stop()


def lock_waiters(lock_file: Path) -> set[int]:
    """The processes blocked in flock on `lock_file` (the '->' lines of /proc/locks)."""
    inode = os.stat(lock_file).st_ino
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
            waiting.add(int(fields[fields.index("->") + 4]))
    return waiting


@contextmanager
def writers_held(platform: ServerPlatform):
    """The SQLite file's writer lock taken here: every transaction of the servers waits until the block ends."""
    lock_file = Path(platform.data / "autoenroll.db").resolve().with_name("autoenroll.db.lock")
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock_file
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def quiet(platform: ServerPlatform) -> bool:
    """Nothing left to publish: no writer but the two enrollments will wait at the lock."""
    db = Database(platform.db_url)
    try:
        return outbox_status(db)["depth"] == 0
    finally:
        db.dispose()


def race(two_servers, new_user, tmp_path, profiles: tuple[str, str], *, replace: bool = False, before=None):
    """A fresh user's two enrollments, one per server, released together once both wait to commit.
    Returns what each got (an Outcome or the AgentError), the user's valid encryption certificates and
    the user's address (each agent's store is tmp_path/store-1 and store-2). `before(client, store, email)`
    runs after the bootstrap; both enroll with `replace`."""
    first, second = two_servers
    _, email = new_user(("smime-users",))
    config = AgentConfig.load(first.agent_config)
    stores = AgentStore(tmp_path / "store-1"), AgentStore(tmp_path / "store-2")
    clients = (RegistrationClient(dataclasses.replace(config, store=stores[0].root)),
               RegistrationClient(dataclasses.replace(config, server=second.url, store=stores[1].root)))
    try:
        actions.bootstrap(clients[0], stores[0], email, first.autoenroll("invite", email).stdout.strip())
        if before is not None:
            before(clients[0], stores[0], email)
        shutil.copytree(stores[0].root / email, stores[1].root / email)
        eventually(lambda: quiet(first), timeout=25, step=0.05, what="the outbox drained")

        def enroll(n: int):
            try:
                return actions.enroll(clients[n], stores[n], email, profiles[n], replace=replace)
            except AgentError as exc:
                return exc

        with ThreadPoolExecutor(2) as pool:
            with writers_held(first) as lock_file:
                futures = [pool.submit(enroll, 0), pool.submit(enroll, 1)]
                eventually(lambda: len(lock_waiters(lock_file) - {os.getpid()}) == 2, timeout=25, step=0.05,
                           what="both enrollments waiting to commit")
            answers = [future.result() for future in futures]
    finally:
        for client in clients:
            client.close()
    return answers, valid_encryption(first, email), email


def valid_encryption(platform: ServerPlatform, email: str) -> list[tuple[str, str]]:
    """(profile, serial) of the user's valid encryption certificates."""
    db = Database(platform.db_url)
    try:
        return [(name, c.serial) for name in ENCRYPTION for c in certificate_history(db, email, name)
                if c.status == "valid"]
    finally:
        db.dispose()


def escrowed_serials(platform: ServerPlatform, email: str) -> set[str]:
    with platform.transaction() as session:
        return set(session.scalars(select(Escrow.serial).where(Escrow.email == email)))


def test_two_first_enrollments_of_one_profile_at_once_issue_one_certificate(two_servers, new_user, tmp_path):
    """The database's unique indexes decide (the renewal key, or the address's encryption slot, whichever
    the database checks first): the loser is a 409 conflict telling which, nothing of it is kept."""
    answers, valid, _ = race(two_servers, new_user, tmp_path, ("smime-encryption-ec", "smime-encryption-ec"))
    refused = [a for a in answers if isinstance(a, AgentError)]
    assert len(refused) == 1 and (refused[0].status, refused[0].code) == (409, "conflict"), answers
    assert ("another request already replaced this certificate" in str(refused[0])
            or "another request issued a current encryption certificate for this address" in str(refused[0]))
    assert len(valid) == 1


def test_enrollments_of_two_encryption_profiles_at_once_leave_one_current_certificate(two_servers, new_user, tmp_path):
    """The one-current-encryption index decides: the loser is a 409 conflict, nothing of it is kept (no
    certificate, no escrow); retried with `replace`, it supersedes the winner's certificate."""
    answers, valid, email = race(two_servers, new_user, tmp_path, ENCRYPTION)
    assert len(valid) == 1, (answers, valid)
    (loser,) = [n for n, a in enumerate(answers) if isinstance(a, AgentError)]
    refused, won = answers[loser], answers[1 - loser]
    assert (refused.status, refused.code) == (409, "conflict"), refused
    assert "another request issued a current encryption certificate for this address" in str(refused)
    assert valid == [(ENCRYPTION[1 - loser], won.serial)]
    first, second = two_servers
    assert escrowed_serials(first, email) == {won.serial}

    platform = (first, second)[loser]
    config = dataclasses.replace(AgentConfig.load(first.agent_config), server=platform.url,
                                 store=tmp_path / f"store-{loser + 1}")
    client = RegistrationClient(config)
    try:
        retried = actions.enroll(client, AgentStore(config.store), email, ENCRYPTION[loser], replace=True)
    finally:
        client.close()
    assert valid_encryption(first, email) == [(ENCRYPTION[loser], retried.serial)]
    db = Database(first.db_url)
    try:
        (winner,) = [c for c in certificate_history(db, email, ENCRYPTION[1 - loser]) if c.serial == won.serial]
    finally:
        db.dispose()
    assert winner.status == "superseded"
    assert escrowed_serials(first, email) == {won.serial, retried.serial}


def test_two_enrollments_at_the_daily_limit_at_once_issue_one_certificate(two_servers, new_user, tmp_path):
    """The daily limit (max_per_day) is read outside the transaction too, but cannot be exceeded: requests
    for one profile that read the same history replace the same latest certificate, so they carry the same
    renewal_key and one commits; the next request reads the new count and is refused (429)."""
    profile = "smime-encryption-ec"
    limit = load_settings(two_servers[0].config).profiles[profile].max_per_day

    def up_to_one_below_the_limit(client, store, email):
        for _ in range(limit - 1):
            actions.enroll(client, store, email, profile, replace=True)

    answers, valid, email = race(two_servers, new_user, tmp_path, (profile, profile), replace=True,
                                 before=up_to_one_below_the_limit)
    refused = [a for a in answers if isinstance(a, AgentError)]
    assert len(refused) == 1 and (refused[0].status, refused[0].code) == (409, "conflict"), answers
    db = Database(two_servers[0].db_url)
    try:
        assert len(certificate_history(db, email, profile)) == limit
    finally:
        db.dispose()
    config = dataclasses.replace(AgentConfig.load(two_servers[0].agent_config), store=tmp_path / "store-1")
    client = RegistrationClient(config)
    try:
        with pytest.raises(AgentError) as over:
            actions.enroll(client, AgentStore(config.store), email, profile, replace=True)
    finally:
        client.close()
    assert over.value.status == 429, over.value
