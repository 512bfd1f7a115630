"""auth/request_checks.py on a real database: every check an agent request makes of the database (agent
revoked, nonce used, the user's certificate revoked or superseded, the entry it was issued to) answered
from ONE statement read ahead from what the body names, and the same answers as asking one by one."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from registration_app.auth import nonces
from registration_app.auth.request_checks import RequestChecks, named_in
from registration_app.store import prepared
from registration_app.store.issuance import insert_issued
from registration_app.store.repos import revoke_agent
from tests.databases import bare_database

TTL = timedelta(minutes=5)
NOW = datetime.now(timezone.utc)


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path) as database:
        yield database


@pytest.fixture
def statements(monkeypatch):
    """How many statements the checks send (the prepared ones run straight on the DBAPI cursor)."""
    sent = [0]
    original = prepared.Prepared._cursor

    def counted(self, conn, params):
        sent[0] += 1
        return original(self, conn, params)

    monkeypatch.setattr(prepared.Prepared, "_cursor", counted)
    return sent


def _certificate(serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "u")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .sign(key, hashes.SHA256()))


def _row(serial: int, *, status: str, issued_at: datetime, entry_id: str | None = "entry-1") -> dict:
    text = format(serial, "x")
    return dict(serial=text, email="u@example.org", user_dn="uid=u,ou=people,dc=example,dc=org", entry_id=entry_id,
                profile="smime-signature", usage="signature", status=status, der=b"\x30", not_before=NOW,
                not_after=NOW + timedelta(days=365), issued_at=issued_at, key_source="client", replaces=None,
                renewal_key=f"u|smime-signature|{text}")


def _body(nonce: str, leaf: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    header = {"alg": "ES256", "nonce": nonce, "x5c": [base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()]}
    protected = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return json.dumps({"protected": protected, "payload": "", "signature": "AA"}).encode()


def test_one_statement_answers_every_check_of_a_request(db, statements):
    old, new = 0x1111, 0x2222
    for serial, issued_at, supersede in ((old, NOW - timedelta(hours=2), []),
                                         (new, NOW - timedelta(hours=1), [{"old": "1111", "new": "2222"}])):
        db.run(lambda conn: insert_issued(conn, [_row(serial, status="valid", issued_at=issued_at)], [dict(
            user_dn="d", email="u@example.org", serial=format(serial, "x"), reason="issued", created_at=NOW,
            attempts=0, next_attempt_at=NOW)], supersede), core=True)
    revoke_agent(db, thumbprint="revoked-agent", subject="cn=a", serial="1", reason="test", actor="t")
    value = nonces.issue(db, TTL)
    leaf = _certificate(old)
    assert named_in(_body(value, leaf)) == (value, "1111")

    statements[0] = 0
    checks = RequestChecks.read(db, "revoked-agent", _body(value, leaf), ca_is_revoked=lambda cert: True)
    assert checks.agent_revoked("revoked-agent") is True
    assert nonces.check(db, value, checks=checks) is not None
    assert checks.is_revoked(leaf) is False
    assert checks.successor_of(NOW, timedelta(minutes=30))(old) == format(new, "x")
    assert checks.successor_of(NOW, timedelta(hours=2))(old) is None  # still inside the grace period
    assert checks.entry_binding(old) == ("entry-1", "uid=u,ou=people,dc=example,dc=org")
    assert statements[0] == 1


def test_what_the_read_ahead_did_not_ask_is_read_when_asked(db, statements):
    db.run(lambda conn: insert_issued(conn, [_row(0x3333, status="revoked", issued_at=NOW)],
                                      [dict(user_dn="d", email="u@example.org", serial="3333", reason="issued",
                                            created_at=NOW, attempts=0, next_attempt_at=NOW)], []), core=True)
    spent = nonces.check(db, nonces.issue(db, TTL))
    assert spent is not None
    db.run(lambda conn: nonces.spend(conn, spent), core=True)

    checks = RequestChecks.read(db, "agent", b"not a JWS", ca_is_revoked=lambda cert: False)
    statements[0] = 0
    assert checks.agent_revoked("agent") is False and statements[0] == 0
    assert checks.is_revoked(_certificate(0x3333)) is True  # a serial the body did not name: read now
    assert nonces.check(db, spent.value, checks=checks) is None  # used, though the read-ahead saw no nonce
    assert checks.entry_binding(0x4444) is None  # not ours
    assert statements[0] == 3


def test_without_the_ca_records_here_revocation_is_asked_of_the_ca(db):
    leaf = _certificate(0x5555)
    asked = []
    checks = RequestChecks.read(db, "agent", None, ca_is_revoked=lambda cert: asked.append(cert) or True,
                                certificates_here=False)
    assert checks.is_revoked(leaf) is True and asked == [leaf]
