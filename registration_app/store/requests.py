"""What the database says about one agent request, read in ONE statement (its own snapshot): is the
agent's TLS certificate revoked, is the request's nonce used, and the row of the user's certificate
if it is ours (status, the entry it was issued to, the certificate that superseded it). Every API
request asks all of these; one round trip instead of five (PERFORMANCE.md, "Per-request reads")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, and_, bindparam, exists, literal, select

from .db import Database
from .prepared import Prepared
from .models import Certificate, Nonce, RevokedAgent

_CERTIFICATES = cast(Table, Certificate.__table__)
_SUCCESSOR = _CERTIFICATES.alias("successor")
_NONCES = cast(Table, Nonce.__table__)
_AGENTS = cast(Table, RevokedAgent.__table__)
_ONE_ROW = select(literal(1).label("one")).subquery("request")

_FACTS = Prepared(
    select(
        exists().where(_AGENTS.c.thumbprint == bindparam("thumbprint")).label("agent_revoked"),
        exists().where(_NONCES.c.value == bindparam("nonce")).label("nonce_used"),
        _CERTIFICATES.c.status, _CERTIFICATES.c.entry_id, _CERTIFICATES.c.user_dn,
        _SUCCESSOR.c.serial.label("successor"), _SUCCESSOR.c.issued_at.label("successor_issued_at"))
    .select_from(
        _ONE_ROW.outerjoin(_CERTIFICATES, _CERTIFICATES.c.serial == bindparam("serial"))
        .outerjoin(_SUCCESSOR, and_(_CERTIFICATES.c.status == "superseded",
                                    _SUCCESSOR.c.serial == _CERTIFICATES.c.superseded_by))))


@dataclass(frozen=True)
class OurCertificate:
    """The row of a certificate we issued, as far as a request's checks need it."""

    serial: str
    status: str
    entry_id: str | None
    user_dn: str
    successor: str | None  # the serial that superseded it (status superseded), if any
    successor_issued_at: datetime | None


@dataclass(frozen=True)
class RequestFacts:
    thumbprint: str
    agent_revoked: bool
    nonce: str | None  # the spelling asked about, and whether a row says it was used
    nonce_used: bool
    serial: str | None  # the certificate asked about, and its row if it is ours
    certificate: OurCertificate | None


def request_facts(db: Database, *, thumbprint: str, nonce: str | None = None,
                  serial: str | None = None) -> RequestFacts:
    """One statement: the agent's revocation, the nonce's use and certificate `serial` (lowercase hex)."""
    (row,) = db.query(_FACTS, {"thumbprint": thumbprint, "nonce": nonce or "", "serial": serial or ""})
    certificate = None
    if serial and row.status is not None:
        certificate = OurCertificate(serial, row.status, row.entry_id, row.user_dn, row.successor,
                                     row.successor_issued_at)
    return RequestFacts(thumbprint, bool(row.agent_revoked), nonce, bool(nonce) and bool(row.nonce_used),
                        serial, certificate)
