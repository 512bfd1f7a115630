"""The database's part of authenticating one agent request, read once: is the agent's TLS certificate
revoked, is the nonce used, is the user's certificate (ours) revoked or superseded, and which directory
entry it was issued to. `RequestChecks.read` asks all of it in one statement (store/requests.py) as
soon as the request arrives, from what the body names before anything is verified; the checks then
answer from it in their usual order (agent first, the nonce last), so a bad signature still burns no
nonce and a revoked agent is still refused before its body is looked at.

Reading before verifying changes nothing that is decided: every fact is re-read by the statement that
acts on it (the nonce's INSERT in the acting transaction decides a race; a revocation committed after
the read is the same race as one committed just after the check)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from ..store.db import Database
from ..store.repos import NonceToken, agent_revoked, parse_nonce
from ..store.requests import OurCertificate, RequestFacts, request_facts
from .chain import parse_leaf


def agent_revocation(db: Database) -> Callable[[str], bool]:
    """identify_agent's `is_revoked` outside an agent API request (no read-ahead): whether the agent
    certificate of that thumbprint is revoked, asked of the database each time (health, the authority API)."""
    return lambda thumbprint: agent_revoked(db, thumbprint)


def named_in(body: bytes | None) -> tuple[str | None, str | None]:
    """(nonce, serial of the first x5c certificate in lowercase hex) as the body's protected header
    names them, unverified; None for whatever is missing or malformed (the verification says why)."""
    if not body:
        return None, None
    try:
        document = json.loads(body)
        protected = document["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        nonce = header.get("nonce")
        nonce = nonce if isinstance(nonce, str) and len(nonce) <= 64 else None
        x5c = header.get("x5c")
        serial = None
        if isinstance(x5c, list) and x5c and isinstance(x5c[0], str):
            serial = format(parse_leaf(base64.b64decode(x5c[0], validate=True)).serial_number, "x")
        return nonce, serial
    except Exception:  # anything malformed: nothing to read ahead, the verification refuses it
        return None, None


@dataclass
class RequestChecks:
    """The answers of one request's checks. `certificates_here`: this process's database holds the CA's
    certificate rows (role all); otherwise revocation is asked of `ca_is_revoked` (a remote CA). The
    successor and the entry binding are read from this process's database either way, as before."""

    db: Database
    facts: RequestFacts
    ca_is_revoked: Callable[[x509.Certificate], bool]
    certificates_here: bool = True

    @classmethod
    def read(cls, db: Database, thumbprint: str, body: bytes | None, *,
             ca_is_revoked: Callable[[x509.Certificate], bool], certificates_here: bool = True,
             now: datetime | None = None) -> RequestChecks:
        nonce, serial = named_in(body)
        token = parse_nonce(db, nonce, now) if nonce is not None else None
        facts = request_facts(db, thumbprint=thumbprint, nonce=token.value if token else None, serial=serial)
        return cls(db, facts, ca_is_revoked, certificates_here)

    def agent_revoked(self, thumbprint: str) -> bool:
        if thumbprint == self.facts.thumbprint:
            return self.facts.agent_revoked
        return request_facts(self.db, thumbprint=thumbprint).agent_revoked

    def nonce_unused(self, value: str, now: datetime | None = None) -> NonceToken | None:
        """The token if `value` is ours, unexpired and not used (nothing is written: auth/nonces.py)."""
        token = parse_nonce(self.db, value, now)
        if token is None:
            return None
        if token.value == self.facts.nonce:
            return None if self.facts.nonce_used else token
        return None if request_facts(self.db, thumbprint="", nonce=token.value).nonce_used else token

    def our_certificate(self, serial: int) -> OurCertificate | None:
        """Our row of certificate `serial`, from the read-ahead when it asked for this serial."""
        text = format(serial, "x")
        if text == self.facts.serial:
            return self.facts.certificate
        return request_facts(self.db, thumbprint="", serial=text).certificate

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Asked about a leaf of our CA whose chain verified (auth/chain.py)."""
        if not self.certificates_here:
            return self.ca_is_revoked(cert)
        row = self.our_certificate(cert.serial_number)
        return row is not None and row.status == "revoked"

    def successor_of(self, now: datetime, grace: timedelta) -> Callable[[int], str | None]:
        """`successor_of(serial)` for verify_user_request: the serial that superseded it more than `grace`
        before `now`, or None (not superseded, or still inside the grace period)."""
        def successor(serial: int) -> str | None:
            row = self.our_certificate(serial)
            if row is None or row.successor is None or row.successor_issued_at is None:
                return None
            return row.successor if row.successor_issued_at <= now - grace else None
        return successor

    def entry_binding(self, serial: int) -> tuple[str | None, str] | None:
        """(entry id or None, user DN) of our certificate `serial`, or None if it is not ours."""
        row = self.our_certificate(serial)
        return (row.entry_id, row.user_dn) if row is not None else None
