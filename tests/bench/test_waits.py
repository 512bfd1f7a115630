"""bench/waits.py: a request thread's sample counts where the thread is blocked now, not a frame it will
return to (the leader running its group's statements is not waiting for a leader)."""

from __future__ import annotations

from bench import waits

REQUEST = "Thread.run (threading.py:982);ThreadWorker.handle_request (gunicorn/workers/gthread.py:771);enroll (registration_app/web/api.py:155)"


def test_each_wait_is_told_by_the_innermost_frames():
    lines = [
        f"{REQUEST};LdapDirectory._publish (directory_sync/ldap.py:1);SimpleLDAPObject._ldap_call (ldap/ldapobject.py:128) 5",
        f"{REQUEST};LdapDirectory.find_user (directory_sync/ldap.py:2);_search_two (directory_sync/ldap.py:3);"
        "SimpleLDAPObject._ldap_call (ldap/ldapobject.py:128) 3",
        f"{REQUEST};Database.run (registration_app/store/db.py:382);GroupCommit.run (registration_app/store/group_commit.py:76);"
        "Event.wait (threading.py:629);Condition.wait (threading.py:327) 4",
        f"{REQUEST};Database._anchored (registration_app/store/db.py:268);__enter__ (contextlib.py:137);"
        "_WriterQueue.held (registration_app/store/db.py:147) 2",
        # the leader running a unit's statement inside GroupCommit.run: running, not waiting
        f"{REQUEST};GroupCommit.run (registration_app/store/group_commit.py:86);GroupCommit._run_units (x.py:1);"
        "Prepared._cursor (registration_app/store/prepared.py:102) 6",
        "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 100",  # not a request thread
    ]
    shares = waits.shares(lines)
    assert shares["slapd: modify (publication)"] == 5 / 20
    assert shares["slapd: search (entitlement)"] == 3 / 20
    assert shares["group commit: waiting for the group"] == 4 / 20
    assert shares["SQLite writer lock: waiting"] == 2 / 20
    assert shares[waits.RUNNING] == 6 / 20
    assert sum(shares.values()) == 1.0
