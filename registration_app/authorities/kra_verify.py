"""What a KRA in its own process checks before it decrypts: the signed requests behind a recovery grant.

A split deployment exists so that a compromised RA cannot read escrowed keys. The RA's word ("the owner
asked", "two officers approved") is therefore worth nothing here; the grant's `evidence` is:

- kind "owner": one JWS signed by the user (chain to the user trust anchors, valid now, not revoked)
  for the path /api/v1/recover, whose payload names this serial or `all: true`, and whose certificate's
  email is the escrow row's;
- kind "officers": the opening JWS (POST /api/v1/recovery-requests: email, serials or all, reason), at
  least `quorum` approvals (/api/v1/recovery-requests/<id>/approve) by distinct officers other than the
  requester that repeat the email and serials, and the requester's release (.../<id>/release); every
  signer is a member of the officers group in LDAP, read live. An approval whose signer has left the
  group, or whose certificate has expired or been revoked since, counts for nothing (officers.py): below
  the quorum the grant is refused, naming the approvals that no longer count.

What it cannot check: the nonces (the RA consumed them, and they are gone) and the TLS channel binding
(`x5t#S256` names the agent's connection to the RA, which the KRA never sees). It relies instead on
single-use evidence: each (JWS, serial) pair is spent once, and a JWS is good for other serials only
within EVIDENCE_REUSE_SECONDS of its first use (one `all: true` request recovers several keys in a row,
but a JWS captured earlier cannot be replayed later for keys escrowed since).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from cryptography import x509

from ..auth.chain import UserTrust
from ..auth.jws import verify_user_request
from ..core.errors import AutoenrollError, DuplicateRecord, Forbidden, NotFound, UnknownCertificate
from ..core.model import AgentIdentity, VerifiedRequest
from ..store.db import Database
from ..store.escrow import escrow_of
from ..store.state import put_state, state_in
from ..store.repos import certificate_by_serial, latest_crl_der, status_of_certificate
from ..core.model import RecoveryGrant
from .officers import OfficerRoster, signer_email

RECOVER_PATH = "/api/v1/recover"
REQUESTS_PATH = "/api/v1/recovery-requests"
EVIDENCE_REUSE_SECONDS = 60
_SPENT = "kra-ev:"  # SyncState names: "kra-ev:" + base64url(SHA-256), 50 characters


class EvidenceRefused(Forbidden):
    code, title = "evidence_refused", "The recovery evidence does not allow this"


@dataclass(frozen=True)
class Release:
    """What the evidence lets the KRA do: wrap the key under the password the user (or officer) signed."""

    password: str
    legacy: bool
    signers: tuple[str, ...]
    discounted: tuple[tuple[str, str], ...] = ()  # (approver, why) of approvals that no longer count


class CaView:
    """The CA as a KRA sees it: its certificate and the revocation status in the shared database; no key."""

    def __init__(self, db: Database, certificate: x509.Certificate) -> None:
        self.db = db
        self.certificate = certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.certificate]

    def is_revoked(self, cert: x509.Certificate) -> bool:
        if cert.issuer != self.certificate.subject:
            return False
        return status_of_certificate(self.db, format(cert.serial_number, "x")) == "revoked"

    def crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        """The CRL the CA last built (the KRA never signs one)."""
        der = latest_crl_der(self.db)
        if not der:
            raise NotFound("no CRL has been published yet; the CA serves it")
        return x509.load_der_x509_crl(der)


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256(b"\0".join(parts)).digest()
    return _SPENT + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _header(jws: bytes) -> dict:
    """The protected header, read leniently: verify_user_request refuses whatever is wrong with it."""
    try:
        protected = json.loads(jws)["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        return header if isinstance(header, dict) else {}
    except (ValueError, KeyError, TypeError, binascii.Error):
        return {}


def _serials(payload: dict) -> list[str] | None:
    """None for `all: true`; otherwise the normalised hex serials (empty if malformed)."""
    if payload.get("all") is True:
        return None
    serials = payload.get("serials")
    if not isinstance(serials, list):
        return []
    try:
        return [format(int(s.lower().removeprefix("0x"), 16), "x") for s in serials if isinstance(s, str)]
    except ValueError:
        return []


def _password(payload: dict) -> str:
    password = payload.get("password")
    if not isinstance(password, str) or not 1 <= len(password) <= 1024:
        raise EvidenceRefused("the signed request carries no usable PKCS#12 password")
    return password


class EvidenceVerifier:
    def __init__(self, *, db: Database, directory, trust: UserTrust,
                 is_revoked: Callable[[x509.Certificate], bool], officers_group: str, quorum: int) -> None:
        self.db = db
        self.directory = directory
        self.trust = trust
        self.is_revoked = is_revoked
        self.officers_group = officers_group
        self.quorum = quorum

    def check(self, serial: str, grant: RecoveryGrant, now: datetime) -> Release:
        """Verify the evidence for this serial and spend it; raises a 4xx AutoenrollError otherwise."""
        row = escrow_of(self.db, serial)
        escrow_email = row.email if row is not None else None
        if escrow_email is None:
            raise UnknownCertificate(f"no escrowed key for serial {serial[:48]}")
        if grant.email.lower() != escrow_email.lower():
            raise EvidenceRefused("the grant names another user than the escrowed key's")
        if grant.kind == "owner":
            release = self._owner(serial, grant, escrow_email, now)
        elif grant.kind == "officers":
            release = self._officers(serial, grant, escrow_email, now)
        else:
            raise EvidenceRefused("unknown kind of recovery grant")
        self._spend(grant.evidence, serial, now)
        return release

    # -- one signed request -----------------------------------------------------------------------
    def _verify(self, jws: bytes, now: datetime) -> tuple[VerifiedRequest, str]:
        """Signature, chain, validity and revocation of one JWS; returns it with its signed URL path.

        verify_user_request is given the JWS's own url and x5t#S256 (the KRA has nothing to compare them
        with) and a nonce check that passes: the RA consumed the nonce (see the module docstring)."""
        header = _header(jws)
        url, binding = header.get("url"), header.get("x5t#S256")
        relay = AgentIdentity(subject="(relayed by the RA)", names=frozenset(), certificate_der=b"",
                              thumbprint=binding if isinstance(binding, str) else "")
        verified = verify_user_request(jws, url=url if isinstance(url, str) else "", agent=relay, trust=self.trust,
                                       consume_nonce=lambda _nonce: True, is_revoked=self.is_revoked, now=now)
        if not verified.user.issuer_is_ours:  # as ra/recovery.py: escrowed keys need our CA's certificates
            raise EvidenceRefused("recovery evidence must be signed with certificates of this server's CA")
        return verified, urlsplit(url if isinstance(url, str) else "").path

    # -- the owner ----------------------------------------------------------------------------------
    def _owner(self, serial: str, grant: RecoveryGrant, escrow_email: str, now: datetime) -> Release:
        if len(grant.evidence) != 1:
            raise EvidenceRefused("an owner's grant carries exactly the user's signed recovery request")
        verified, path = self._verify(grant.evidence[0], now)
        if path != RECOVER_PATH:
            raise EvidenceRefused(f"the signed request was for {path[:80]!r}, not {RECOVER_PATH}")
        if verified.user.email.lower() != escrow_email.lower():
            raise EvidenceRefused("the signed request is not the key owner's")
        if verified.user.issuer_is_ours:
            # An address given to another directory entry does not give its escrowed keys to the old holder.
            signer_entry, key_entry = self._entry_of(format(verified.user.serial, "x")), self._entry_of(serial)
            if signer_entry and key_entry and signer_entry != key_entry:
                raise EvidenceRefused("the signed request's certificate belongs to another directory entry "
                                      "than the escrowed key")
        wanted = _serials(verified.payload)
        if wanted is not None and serial not in wanted:
            raise EvidenceRefused(f"the signed request does not name serial {serial[:48]}")
        return Release(password=_password(verified.payload), legacy=verified.payload.get("pkcs12_legacy") is True,
                       signers=(verified.user.email,))

    def _entry_of(self, serial: str) -> str | None:
        """The directory entry id a certificate of ours was issued to (None: unknown or older than ids)."""
        row = certificate_by_serial(self.db, serial)
        return row.entry_id if row is not None else None

    # -- m-of-n officers ----------------------------------------------------------------------------
    def _officers(self, serial: str, grant: RecoveryGrant, escrow_email: str, now: datetime) -> Release:
        opening, approvals, release = [], [], []
        request_ids = set()
        for jws in grant.evidence:
            path = urlsplit(str(_header(jws).get("url") or "")).path
            head, _, action = path.rpartition("/")
            parent, _, request_id = head.rpartition("/")
            if path != REQUESTS_PATH and (parent != REQUESTS_PATH or action not in ("approve", "release")
                                          or not request_id):
                raise EvidenceRefused(f"a signed request for {path[:80]!r} is no recovery evidence")
            if action == "approve":
                approvals.append(jws)  # verified below: one whose signer no longer counts is only discounted
                request_ids.add(request_id)
                continue
            verified, _ = self._verify(jws, now)
            if path == REQUESTS_PATH:
                opening.append(verified)
            else:
                request_ids.add(request_id)
                release.append(verified)
        if len(opening) != 1 or len(release) != 1:
            raise EvidenceRefused("an officers' grant carries one opening, the approvals and one release")
        if request_ids != {grant.request_id}:
            raise EvidenceRefused("the approvals and the release are not all for the granted request")
        opened = opening[0]
        requester = opened.user.email.lower()
        if release[0].user.email.lower() != requester:
            raise EvidenceRefused("the release is not signed by the officer who opened the request")
        target = opened.payload.get("email")
        if not isinstance(target, str) or target.lower() != escrow_email.lower():
            raise EvidenceRefused("the opening request names another user than the escrowed key's")
        opened_serials = _serials(opened.payload)
        if opened_serials is not None and serial not in opened_serials:
            raise EvidenceRefused(f"the opening request does not name serial {serial[:48]}")
        self._require_officer(requester)
        approvers, discounted = set(), []
        for jws in approvals:
            try:  # validity and revocation of the approver's certificate, as of now
                approval, _ = self._verify(jws, now)
            except AutoenrollError as exc:
                discounted.append((signer_email(jws) or "an approver", exc.code))
                continue
            who = approval.user.email.lower()
            approved = _serials(approval.payload)
            if who == requester or who in approvers:
                continue  # a self-approval or a second approval by the same officer counts for nothing
            named = approval.payload.get("email")
            same_serials = approved is not None and serial in approved and \
                (opened_serials is None or sorted(approved) == sorted(opened_serials))
            if not isinstance(named, str) or named.lower() != escrow_email.lower() or not same_serials:
                raise EvidenceRefused(f"the approval by {who} does not repeat the request's email and serials")
            why = self._roster.membership(who)
            if why is not None:
                discounted.append((who, why))
                continue
            approvers.add(who)
        if len(approvers) < self.quorum:
            gone = "".join(f"; {who}: {why}" for who, why in discounted)
            raise EvidenceRefused(f"{len(approvers)} distinct approvals by other current officers; "
                                  f"{self.quorum} are needed{gone}")
        return Release(password=_password(release[0].payload),
                       legacy=release[0].payload.get("pkcs12_legacy") is True,
                       signers=(requester, *sorted(approvers)), discounted=tuple(discounted))

    @property
    def _roster(self) -> OfficerRoster:
        return OfficerRoster(self.directory, self.officers_group, self.is_revoked)

    def _require_officer(self, email: str) -> None:
        why = self._roster.membership(email)
        if why is not None:
            raise EvidenceRefused(f"{email} is not a member of {self.officers_group} ({why})")

    # -- single use ---------------------------------------------------------------------------------
    def _spend(self, evidence: tuple[bytes, ...], serial: str, now: datetime) -> None:
        window = timedelta(seconds=EVIDENCE_REUSE_SECONDS)

        def work(session):
            for jws in evidence:
                first_name, pair_name = _hash(jws), _hash(jws, serial.encode())
                first = state_in(session, first_name)
                if first is None:
                    put_state(session, first_name, now.isoformat())
                elif now - datetime.fromisoformat(first) > window:
                    raise EvidenceRefused("this signed request was used before; sign a new one")
                if state_in(session, pair_name) is not None:
                    raise EvidenceRefused("this signed request was used for this key already; sign a new one")
                put_state(session, pair_name, now.isoformat())

        try:
            self.db.run(work)
        except DuplicateRecord as exc:  # a concurrent use of the same evidence won the race
            raise EvidenceRefused("this signed request is being used already") from exc


if TYPE_CHECKING:  # mypy (make test) checks that CaView has the signatures of the Protocol
    from ..core.ports import CaStatus

    def _is_ca_status(implementation: CaView) -> CaStatus:
        return implementation
