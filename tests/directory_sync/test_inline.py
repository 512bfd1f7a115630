"""The request path's publications as a group commit (directory_sync/inline.py), against a private slapd
and SQLite: several users in one LDAP transaction, a refused transaction costing nothing but a
publication each, records changed meanwhile published again, and a request queued behind a stalled
directory answered "not yet" while its certificate still gets there."""

from __future__ import annotations

import dataclasses
import logging

import os
import signal
import threading
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bench.platform import eventually
from directory_sync.inline import Request
from directory_sync.slapd import PrivateSlapd
from registration_app.authorities.key_authority import Decision, IssueRequest
from registration_app.store.models import Outbox
from tests.directory_sync.world import PEOPLE, add_group, make_services, profiles_for
from tests.ldap_admin import MODIFY_ADD, MODIFY_REPLACE, LdapAdmin

PROFILE = "smime-encryption-ec"
CERTIFICATE = "userCertificate;binary"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    """This module's own slapd: one test stops it for a moment (SIGSTOP)."""
    instance = PrivateSlapd(tmp_path_factory.mktemp("slapd-inline"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def admin(slapd):
    conn = LdapAdmin.for_slapd(slapd)
    yield conn
    conn.unbind()


@pytest.fixture(scope="module")
def group(admin):
    return add_group(admin, "inline-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    settings = dataclasses.replace(slapd.settings(), inline_transactions=True)  # off by default (config.py)
    s = make_services(tmp_path_factory.mktemp("inline"), settings, profiles=profiles_for(group))
    yield s
    s.close()


def entitled_users(services, admin, group, count: int) -> list:
    users = []
    for _ in range(count):
        uid = "i-" + uuid.uuid4().hex[:12]
        dn, email = f"uid={uid},{PEOPLE}", f"{uid}@example.org"
        assert admin.add(dn, ["inetOrgPerson", "pkiUser"], {"uid": uid, "cn": uid, "sn": "T", "mail": email}), \
            admin.result
        assert admin.modify(group, {"member": [(MODIFY_ADD, [dn])]}), admin.result
        users.append(services.directory.find_user(email))  # as the request's entitlement search reads it
    return users


def enroll(services, user):
    """The issuance of an enrollment (its outbox row held back for the inline publication)."""
    return services.key_authority.issue(
        IssueRequest(user=user, profile=services.settings.profiles[PROFILE], actor="test", password="pw"),
        decision=Decision(publish_inline=True))


def request_of(user, issued) -> Request:
    return Request(user.dn, [issued.outbox], issued.user_certificates, user)


def shown(admin, dn: str) -> list[bytes]:
    return admin.values(dn, CERTIFICATE)


def der(issued) -> bytes:
    return issued.certificate.public_bytes(Encoding.DER)


def marked_done(services, issued) -> bool:
    assert services.publisher.completions.flush(timeout=10)
    with services.db.read() as session:
        return session.get(Outbox, issued.outbox.id).done_at is not None


def test_concurrent_requests_users_are_published_in_one_ldap_transaction(services, admin, group):
    inline = services.publisher.inline
    users = entitled_users(services, admin, group, 5)
    issued = [enroll(services, user) for user in users]
    batch = [request_of(user, one) for user, one in zip(users, issued)]
    before = (inline.batches, inline.batched_users)

    inline.publish_batch(batch)

    assert (inline.batches, inline.batched_users) == (before[0] + 1, before[1] + 5)
    assert all(request.published for request in batch)
    for user, one in zip(users, issued):
        assert shown(admin, user.dn) == [der(one)]
        assert marked_done(services, one)


def test_requests_of_concurrent_threads_are_all_answered_published(services, admin, group):
    users = entitled_users(services, admin, group, 8)
    issued = [enroll(services, user) for user in users]
    answers: dict[str, bool] = {}

    def answer(user, one):
        answers[user.dn] = services.ra.publish_now(user.dn, one, entry=user)

    threads = [threading.Thread(target=answer, args=pair) for pair in zip(users, issued)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers == {user.dn: True for user in users}
    for user, one in zip(users, issued):
        assert shown(admin, user.dn) == [der(one)]


def test_a_transaction_refused_for_one_changed_entry_publishes_each_user_alone(services, admin, group):
    inline = services.publisher.inline
    users = entitled_users(services, admin, group, 3)
    issued = [enroll(services, user) for user in users]
    # Another writer changes one entry after its request read it: that modify's assertion fails, so the
    # server applies none of the transaction's modifies.
    assert admin.modify(users[1].dn, {"description": [(MODIFY_REPLACE, ["changed meanwhile"])]}), admin.result
    before = inline.batches

    inline.publish_batch([request_of(user, one) for user, one in zip(users, issued)])

    assert inline.batches == before
    for user, one in zip(users, issued):
        assert shown(admin, user.dn) == [der(one)]
        assert marked_done(services, one)


def test_a_revocation_committed_after_the_rows_were_read_is_published_again(services, admin, group):
    users = entitled_users(services, admin, group, 3)
    issued = [enroll(services, user) for user in users]
    batch = [request_of(user, one) for user, one in zip(users, issued)]
    services.ca.revoke(issued[0].serial, x509.ReasonFlags.key_compromise, actor="test")  # after the issuance read

    services.publisher.inline.publish_batch(batch)

    assert shown(admin, users[0].dn) == []  # published again from the rows as they are now
    assert [shown(admin, user.dn) for user in users[1:]] == [[der(one)] for one in issued[1:]]


def thread_states(pid: int) -> list[str]:
    """The scheduler state of each thread of the process (T: stopped)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return states


def test_a_request_queued_behind_a_stalled_directory_says_not_yet_and_the_worker_publishes_it(
        services, slapd, admin, group, caplog):
    first, second = entitled_users(services, admin, group, 2)
    leading, queued = enroll(services, first), enroll(services, second)
    publisher, inline = services.publisher, services.publisher.inline
    wait, publisher.inline_wait = publisher.inline_wait, 0.3
    answers: dict[str, bool] = {}
    caplog.set_level(logging.INFO)  # shown if the answers are not as expected
    pid = slapd.pid
    os.kill(pid, signal.SIGSTOP)  # the first request's modify waits for slapd
    try:
        eventually(lambda: set(thread_states(pid)) == {"T"}, timeout=10, step=0.01, what="slapd stopped")
        ahead = threading.Thread(target=lambda: answers.setdefault(
            "first", services.ra.publish_now(first.dn, leading, entry=first)))
        ahead.start()
        eventually(lambda: inline._leading, timeout=10, step=0.01, what="the first request in the directory")
        answers["second"] = services.ra.publish_now(second.dn, queued, entry=second)
        stopped = thread_states(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
        publisher.inline_wait = wait
    ahead.join()

    # the second agent is told: not in the directory yet
    assert answers == {"first": True, "second": False}, (stopped, [r.getMessage() for r in caplog.records])
    assert shown(admin, first.dn) == [der(leading)]
    assert publisher.drain(user_dn=second.dn) == 1  # its row was handed to the worker at once
    assert shown(admin, second.dn) == [der(queued)]
