"""Oracles and guessing against the real platform: enrollment codes (every bad code answered alike,
wrong MACs limited per code id and per agent, a code burnt after a few), and serials of other users
(answered as serials that do not exist)."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import select, update

from registration_app.agent.jws import mac_bootstrap_request
from registration_app.core.codes import parse_code
from registration_app.store.models import AuditEvent, EnrollmentCode
from tests.adversarial.test_refusals import assert_refused, csr_for, pem
from tests.fault import records


@pytest.fixture
def guesser(adversary, tmp_path):
    """A user server of its own: its failures must not count against the agent the other tests use."""
    name = f"guesser-{secrets.token_hex(4)}.example.org"
    adversary.platform.autoenroll("client-cert", name, "--out", str(tmp_path))
    conn = adversary.connection(cert=tmp_path / f"{name}.pem", key=tmp_path / f"{name}.key")
    yield conn
    conn.close()


def bootstrap(conn, email: str, code_id: str, mac_key: bytes):
    body = mac_bootstrap_request({"csr": pem(csr_for(email))}, code_id=code_id, secret=mac_key,
                                 nonce=conn.nonce(), url=conn.url("bootstrap"), agent_thumbprint=conn.thumbprint)
    return conn.post("bootstrap", body)


def invite(adversary):
    user = adversary.user()
    code_id, mac_key = parse_code(adversary.platform.autoenroll("invite", user.email).stdout.strip())
    return user, code_id, mac_key


def answer(reply) -> tuple:
    problem = reply.json()
    return reply.status, problem["code"], problem["title"], problem["detail"]


def test_every_bad_enrollment_code_gets_the_same_answer(adversary, guesser):
    user, code_id, mac_key = invite(adversary)
    used_user, used_id, used_key = invite(adversary)
    assert bootstrap(guesser, used_user.email, used_id, used_key).status == 201
    expired_user, expired_id, expired_key = invite(adversary)
    with records.transaction(adversary.platform.db_url) as session:
        session.execute(update(EnrollmentCode).where(EnrollmentCode.id == expired_id)
                        .values(expires_at=EnrollmentCode.created_at))
    cases = {"unknown id": ("a@example.org", "nosuch01", secrets.token_bytes(32)),
             "wrong MAC": (user.email, code_id, secrets.token_bytes(32)),
             "used": (used_user.email, used_id, used_key),
             "expired": (expired_user.email, expired_id, expired_key)}
    answers = {}
    for case, (email, kid, key) in cases.items():
        before = records.counts(adversary.platform)
        reply = bootstrap(guesser, email, kid, key)
        assert_refused(adversary, before, reply, 401, "bad_enrollment_code")
        answers[case] = answer(reply)
    assert len(set(answers.values())) == 1, answers
    assert bootstrap(guesser, user.email, code_id, mac_key).status == 201  # one wrong MAC did not burn it


def test_wrong_macs_burn_the_code_and_are_refused_with_429_for_known_and_unknown_ids_alike(adversary, guesser):
    user, code_id, mac_key = invite(adversary)
    unknown = "nosuch" + secrets.token_hex(1)
    for _ in range(5):  # enrollment_code_max_failures
        assert answer(bootstrap(guesser, user.email, code_id, secrets.token_bytes(32))) == \
            answer(bootstrap(guesser, user.email, unknown, secrets.token_bytes(32)))
    before = records.counts(adversary.platform)
    limited = bootstrap(guesser, user.email, code_id, mac_key)  # even the right MAC: the code is burnt
    assert_refused(adversary, before, limited, 429, "rate_limited")
    assert 0 < int(limited.headers["retry-after"]) <= 900
    assert answer(bootstrap(guesser, user.email, unknown, mac_key))[:3] == answer(limited)[:3]
    with records.transaction(adversary.platform.db_url) as session:
        row = session.get(EnrollmentCode, code_id)
        assert row.burnt_at is not None and row.used_at is None and row.failures == 5
        burnt = session.execute(select(AuditEvent).where(AuditEvent.event == "enrollment_code.burnt",
                                                         AuditEvent.subject == user.email)).scalars().all()
    assert [e.detail["code_id"] for e in burnt] == [code_id]


def test_an_agent_that_keeps_guessing_is_refused_with_429_whatever_code_it_tries(adversary, guesser):
    user, code_id, mac_key = invite(adversary)
    for i in range(20):  # bootstrap_failures_per_agent, each on an id of its own
        assert bootstrap(guesser, user.email, f"guess{i:03d}", secrets.token_bytes(32)).status == 401
    refused = bootstrap(guesser, user.email, code_id, mac_key)
    assert refused.status == 429 and refused.json()["code"] == "rate_limited" and refused.headers["retry-after"]
    other = adversary.connection()  # another agent is not held back by this one
    try:
        assert bootstrap(other, user.email, code_id, mac_key).status == 201
    finally:
        other.close()


def signed_for(adversary, conn, user, path: str, payload: dict) -> bytes:
    from tests.adversarial.test_refusals import signed
    return signed(adversary, conn, user=user, payload=payload, path=path)


def test_someone_elses_serial_is_answered_as_a_serial_that_does_not_exist(adversary):
    """Recovering or revoking another user's certificate tells nothing more than an unknown serial."""
    conn = adversary.connection()
    owner = adversary.user()
    issued = conn.enroll(owner, {"profile": "smime-encryption-ec", "password": "owner-password"})
    assert issued.status == 201, issued.body[:300]
    theirs, unknown = issued.json()["serial"], "abcdef0123456789"
    for path, payload in (("recover", {"serials": [], "password": "x" * 16}), ("revoke", {})):
        answers = []
        for serial in (theirs, unknown):
            body = dict(payload, serials=[serial]) if path == "recover" else {"serial": serial}
            if path == "recover":
                body["password"] = "attacker-password"
            before = records.counts(adversary.platform)
            reply = conn.post(path, signed_for(adversary, conn, adversary.entitled, path, body))
            assert_refused(adversary, before, reply, 404, "unknown_certificate")
            answers.append((reply.status, reply.json()["code"],
                            reply.json()["detail"].replace(serial, "<serial>")))
        assert answers[0] == answers[1], answers
    conn.close()
    with records.transaction(adversary.platform.db_url) as session:
        assert session.execute(select(records.Certificate.status).where(
            records.Certificate.serial == theirs)).scalar_one() == "valid"
