"""Revocations racing enrollments for the same users, against the real server (gunicorn with TLS, 2
workers, slapd): once every request has been answered, no certificate of ours that the database calls
revoked is in LDAP, and each entry shows exactly what our records say, without a worker pass or a
reconcile; draining the outbox afterwards changes nothing."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from directory_sync.plan import wanted_values
from registration_app.agent import actions
from registration_app.agent.client import AgentConfig, RegistrationClient
from registration_app.agent.store import AgentStore
from registration_app.settings import load_settings
from registration_app.store.repos import certificates_of
from bench.platform import SUITE_SETTINGS, make_platform
from tests.e2e.test_enrollment import ldap_certificates

USERS = 10
ROUNDS = 30  # USERS x ROUNDS races
ENROLLED, REVOKED = "race-enrolled", "race-revoked"
GROUP = "cn=smime-users,ou=groups,dc=example,dc=org"
PROFILES = f"""
[profiles.smime-signature]
usage = "signature"
key_type = "ec-p256"
key_source = "either"
groups = ["{GROUP}"]

[profiles.{ENROLLED}]
usage = "encryption"
key_type = "ec-p256"
max_per_day = 1000
coexist = true
groups = ["{GROUP}"]

[profiles.{REVOKED}]
usage = "encryption"
key_type = "ec-p256"
max_per_day = 1000
coexist = true
groups = ["{GROUP}"]
"""


@pytest.fixture(scope="module")
def races(tmp_path_factory, slapd):
    """A platform of its own (two encryption profiles a user may hold side by side, hundreds of
    certificates a day), whose PKCS#12 use the 20,000 PBKDF2 iterations a deployment may set: built
    after the enrollment's transaction, they leave a revocation time to commit and publish before the
    enrollment publishes what its transaction read."""
    p = make_platform(tmp_path_factory.mktemp("races"), slapd.url, extra_toml=PROFILES, **SUITE_SETTINGS)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AUTOENROLL_PKCS12_ITERATIONS", "20000")
            p.start()
        yield p
    finally:
        p.stop()


def out_of_line(platform, dn: str, email: str) -> int | None:
    """None if the entry shows exactly our values that our records (read now) say it must, in their
    order; else how many certificates of ours that the database calls revoked it still shows."""
    with platform.transaction() as session:
        rows = certificates_of(session, dn)
    shown = list(wanted_values(rows, load_settings(platform.config).profiles, datetime.now(timezone.utc)).shown)
    ours, revoked = {r.der for r in rows}, {r.der for r in rows if r.status == "revoked"}
    values = ldap_certificates(platform, email)  # what a mail client sees
    return None if [v for v in values if v in ours] == shown else len(revoked & set(values))


def test_revocations_racing_enrollments_leave_the_directory_as_the_database_says(races, new_user, tmp_path):
    config = AgentConfig.load(races.agent_config)
    store, second = AgentStore(config.store), AgentStore(tmp_path / "second-store")
    users = [new_user(groups=("smime-users",)) for _ in range(USERS)]
    setup = RegistrationClient(config)
    for _, email in users:
        actions.bootstrap(setup, store, email, races.autoenroll("invite", email).stdout.strip())
        actions.enroll(setup, store, email, ENROLLED, replace=True)
        shutil.copytree(store.root / email, second.root / email)  # the revoker's own copy of the user's folder

    enrolling, revoking = RegistrationClient(config), RegistrationClient(config)
    stale = {}

    def race(n: int, dn: str, email: str) -> None:
        """The user revokes (keyCompromise) a certificate of theirs while an encryption certificate is
        enrolled: the rows the enrollment's transaction reads call it valid unless the revocation
        committed first. The revocation leaves after 0 to 3 nonce round trips, so that it commits now
        before, now inside the time between the enrollment's transaction and its publication."""
        target = actions.enroll(revoking, second, email, REVOKED, replace=True).serial
        start = threading.Barrier(2)

        def enroll():
            start.wait()
            actions.enroll(enrolling, store, email, ENROLLED, replace=True)

        def revoke():
            start.wait()
            for _ in range(n % 4):
                assert revoking.session.get(revoking.url("nonce"), timeout=30).status_code == 200
            assert actions.revoke(revoking, second, email, target, "keyCompromise")["status"] == "revoked"

        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(enroll), pool.submit(revoke)]:
                future.result()
        wrong = out_of_line(races, dn, email)  # both were answered: both publications are done
        if wrong is not None:
            stale[(n, email)] = wrong

    for n in range(ROUNDS):
        for dn, email in users:
            race(n, dn, email)
    assert not stale, f"after {len(stale)} of {USERS * ROUNDS} races LDAP was not what the database says " \
                      f"(revoked certificates still published: {sum(stale.values())})"

    assert races.autoenroll("sync", "drain").returncode == 0  # what the outbox still holds changes nothing
    assert all(out_of_line(races, dn, email) is None for dn, email in users)
    for client in (setup, enrolling, revoking):
        client.close()
