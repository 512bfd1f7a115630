"""Key recovery: the user themself, or m-of-n recovery officers for someone else.

Officers are members of the configured LDAP group, authenticated by their own certificates (a JWS
like any user's). A request names the user and certificates; m officers other than the requester
approve; the requester releases it exactly once (an atomic approved → released transition), and the
KRA decrypts only for a released request that covers the serial. Every step is audited.

An approval counts at release only if its officer still is one (authorities/officers.py: member of the
group, read live; the signing certificate valid and not revoked). Approvals that no longer count are
shown by `view` (`discounted`), named in the release's audit row, and never forwarded to the KRA; below
the quorum the release is refused and nothing is claimed, so an officer put back (or another officer's
approval) lets the same request be released.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509

from ..auth.anchors import require_own_ca, user_entry
from ..authorities.officers import OfficerRoster, signer_certificate
from ..core.dn import dn_key
from ..core.errors import (AlreadyApproved, BadRequest, NotFound, NotOfficer, NotRequester,
                          RecoveryExpired, RecoveryNotReady, SelfApproval, UnknownCertificate)
from ..core.model import RecoveryGrant, VerifiedRequest
from ..core.ports import Directory, RecoveryAuthority
from .authority import check_same_entry
from ..settings import Settings
from ..store import audit
from ..store.db import Database
from ..store.escrow import (add_approval, add_recovery_request, approval_count, approval_evidence, approval_of,
                           approvals_of, certificates_by_serials, claim_release, escrowed_serials, own_certificates,
                           recovery_request_ids, recovery_request_in)
from ..store.models import Certificate, RecoveryRequest


def certificate_view(cert: Certificate, now: datetime, escrowed: bool) -> dict:
    state = cert.status
    if state == "valid" and cert.not_after <= now:
        state = "expired"
    return {"serial": cert.serial, "profile": cert.profile, "usage": cert.usage, "status": state,
            "not_before": cert.not_before.isoformat(), "not_after": cert.not_after.isoformat(),
            "revocation_reason": cert.revocation_reason, "escrowed": escrowed}


def _serials(payload: dict) -> list[str] | None:
    """None means all; otherwise a list of lowercase hex serials."""
    if payload.get("all") is True:
        return None
    serials = payload.get("serials")
    if not isinstance(serials, list) or not serials or len(serials) > 1000 or \
            not all(isinstance(s, str) and 0 < len(s) <= 48 for s in serials):
        raise BadRequest("send 'serials' (a list of hex serial numbers) or 'all': true")
    try:
        return [format(int(s.lower().removeprefix("0x"), 16), "x") for s in serials]
    except ValueError as exc:
        raise BadRequest("serial numbers are hexadecimal") from exc


def _password(payload: dict) -> str:
    password = payload.get("password")
    if not isinstance(password, str) or not 1 <= len(password) <= 1024:
        raise BadRequest("a PKCS#12 password of 1 to 1024 characters is required")
    return password


@dataclass
class Recovery:
    settings: Settings
    db: Database
    directory: Directory
    kra: RecoveryAuthority
    ca_chain: list
    is_revoked: Callable[[x509.Certificate], bool]  # the CA's revocation status of a certificate, read on every call

    @property
    def roster(self) -> OfficerRoster:
        return OfficerRoster(self.directory, self.settings.recovery_officers_group, self.is_revoked)

    # -- listing --------------------------------------------------------------------------------
    def _own_certificates(self, email: str, user_dn: str, usage: str | None = None) -> list[tuple]:
        return own_certificates(self.db, email, user_dn, usage)

    def _entry(self, request: VerifiedRequest, what: str):
        # Escrowed keys (and the listing of them) need our CA's certificate: another anchor that can
        # issue a certificate for an address must not obtain that address's private keys.
        require_own_ca(request.user, what)
        user = user_entry(self.directory, request.user)
        check_same_entry(self.db, request.user, user, actor=request.agent.subject)  # not another entry's
        return user

    def list_own(self, request: VerifiedRequest, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        user = self._entry(request, "listing the certificates and escrowed keys")
        usage = request.payload.get("usage")
        if usage is not None and usage not in ("signature", "encryption"):
            raise BadRequest("usage must be 'signature' or 'encryption'")
        rows = self._own_certificates(user.email, user.dn, usage)
        return {"email": user.email, "certificates": [certificate_view(c, now, e is not None) for c, e in rows]}

    # -- self-service ---------------------------------------------------------------------------
    def recover_own(self, request: VerifiedRequest, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        payload = request.payload
        password, wanted = _password(payload), _serials(payload)
        legacy = payload.get("pkcs12_legacy", False) is True
        user = self._entry(request, "recovering escrowed keys")
        own = {c.serial: (c, e) for c, e in self._own_certificates(user.email, user.dn, "encryption")}
        if wanted is None:
            wanted = [s for s, (_, e) in own.items() if e is not None]
        for serial in wanted:
            if serial not in own:  # someone else's serial is answered as one that does not exist
                raise UnknownCertificate(f"{user.email} has no encryption certificate with serial {serial}")
            if own[serial][1] is None:
                raise UnknownCertificate(f"certificate {serial} has no escrowed key")
        grant = RecoveryGrant(kind="owner", email=user.email, actor=request.agent.subject + f" for {user.email}",
                              evidence=(request.raw,))
        keys = [self._package(own[s][0], grant, password, legacy, now) for s in wanted]
        return {"email": user.email, "keys": keys}

    def _package(self, cert: Certificate, grant: RecoveryGrant, password: str, legacy: bool, now: datetime) -> dict:
        # The KRA wraps the key itself, so a KRA in another process never hands the raw key to the RA.
        p12 = self.kra.recover_pkcs12(cert.serial, grant, password, legacy,
                                      f"{cert.email} {cert.profile} {cert.serial}", self.ca_chain, now=now)
        return {**certificate_view(cert, now, True), "pkcs12": base64.b64encode(p12).decode()}

    # -- officers -------------------------------------------------------------------------------
    def _officer(self, request: VerifiedRequest) -> str:
        require_own_ca(request.user, "acting as a recovery officer")
        user = self.directory.find_user(request.user.email)
        if user is not None:
            check_same_entry(self.db, request.user, user, actor=request.agent.subject)
        group = dn_key(self.settings.recovery_officers_group)
        if user is None or group not in {dn_key(g) for g in self.directory.groups_of(user)}:
            raise NotOfficer(f"{request.user.email} is not a member of {self.settings.recovery_officers_group}")
        return user.email

    def _standing(self, approvals: list[tuple[str, bytes | None]], now: datetime
                  ) -> tuple[list[tuple[str, bytes | None]], list[dict]]:
        """(approvals that count now, [{officer, why}] of those that no longer do), in their order."""
        roster, counted, discounted = self.roster, [], []
        for officer, evidence in approvals:
            why = roster.why_not_counted(officer, signer_certificate(evidence), now)
            if why is None:
                counted.append((officer, evidence))
            else:
                discounted.append({"officer": officer, "why": why})
        return counted, discounted

    def open_request(self, request: VerifiedRequest, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        officer = self._officer(request)
        payload = request.payload
        target = payload.get("email")
        reason = payload.get("reason")
        if not isinstance(target, str) or not target or len(target) > 320:
            raise BadRequest("field 'email' names whose keys are to be recovered")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            raise BadRequest("field 'reason' is required (why the keys are needed)")
        wanted = _serials(payload)
        escrowed = escrowed_serials(self.db, target)
        if wanted is None:
            wanted = sorted(escrowed)
        missing = [s for s in wanted if s not in escrowed]
        if missing or not wanted:
            raise UnknownCertificate(f"no escrowed key of {target} with serial {', '.join(missing) or '(none)'}")
        request_id = secrets.token_hex(8)
        ttl = timedelta(hours=self.settings.recovery_request_ttl_hours)

        def work(session):
            add_recovery_request(session, id=request_id, requester=officer, target_email=target.lower(),
                                 serials=wanted, reason=reason, status="pending", created_at=now,
                                 expires_at=now + ttl, evidence=request.raw)
            audit.append(session, event="recovery.requested", outcome="done", actor=officer, subject=target,
                         now=now, detail={"request_id": request_id, "serials": wanted, "reason": reason})

        self.db.run(work)
        return self.view(request_id, now)

    def _load(self, session, request_id: str, now: datetime) -> RecoveryRequest:
        row = recovery_request_in(session, request_id) if isinstance(request_id, str) and len(request_id) <= 32 else None
        if row is None:
            raise NotFound(f"no recovery request {request_id!r}")
        if row.status in ("pending", "approved") and row.expires_at <= now:
            row.status = "expired"
        return row

    def approve(self, request: VerifiedRequest, request_id: str, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        officer = self._officer(request)
        # An approval signed with a certificate revoked or expired since no longer counts: its officer may
        # approve again (with their new certificate), which replaces it.
        earlier = approval_evidence(self.db, request_id, officer)
        stale = earlier is not None and \
            self.roster.why_not_counted(officer, signer_certificate(earlier), now) is not None

        def work(session):
            row = self._load(session, request_id, now)
            if row.status == "expired":
                return RecoveryExpired(f"recovery request {request_id} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC")
            if row.requester == officer:
                return SelfApproval("the officer who opened a recovery request cannot approve it")
            if row.status not in ("pending", "approved"):
                return RecoveryNotReady(f"recovery request {request_id} is {row.status}")
            if request.payload.get("email") != row.target_email or request.payload.get("serials") != row.serials:
                # An approval names what it approves, so it cannot be moved to another request.
                return BadRequest("an approval must repeat the request's 'email' and 'serials' exactly "
                                  "(as shown by the show action)")
            done = approval_of(session, request_id, officer)
            if done is not None and not stale:
                return AlreadyApproved(f"{officer} already approved request {request_id}")
            if done is not None:
                done.at, done.evidence = now, request.raw
            else:
                add_approval(session, request_id=request_id, officer=officer, at=now, evidence=request.raw)
            count = approval_count(session, request_id)
            if count >= self.settings.recovery_quorum:
                row.status = "approved"
            audit.append(session, event="recovery.approved", outcome="done", actor=officer,
                         subject=row.target_email, now=now,
                         detail={"request_id": request_id, "approvals": count,
                                 "quorum": self.settings.recovery_quorum, "replaces_stale": done is not None})
            return None

        error = self.db.run(work)  # an expiry found here is committed before the refusal is raised
        if error is not None:
            raise error
        return self.view(request_id, now)

    def refuse(self, request: VerifiedRequest, request_id: str, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        officer = self._officer(request)

        def work(session):
            row = self._load(session, request_id, now)
            if row.status not in ("pending", "approved"):
                return RecoveryNotReady(f"recovery request {request_id} is {row.status}")
            row.status = "refused"
            audit.append(session, event="recovery.refused", outcome="done", actor=officer,
                         subject=row.target_email, now=now, detail={"request_id": request_id})
            return None

        error = self.db.run(work)
        if error is not None:
            raise error
        return self.view(request_id, now)

    def release(self, request: VerifiedRequest, request_id: str, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        officer = self._officer(request)
        password = _password(request.payload)
        legacy = request.payload.get("pkcs12_legacy", False) is True
        quorum = self.settings.recovery_quorum
        # Each approval is judged now, from LDAP and the CA, before the claim (no LDAP inside a transaction).
        with self.db.read() as session:
            counted, discounted = self._standing(approvals_of(session, request_id), now)

        def work(session):
            row = self._load(session, request_id, now)
            if row.status == "expired":
                return RecoveryExpired(f"recovery request {request_id} expired; open a new one"), None
            if row.requester != officer:
                return NotRequester(f"recovery request {request_id} was opened by {row.requester}"), None
            detail = {"request_id": request_id, "counted": [o for o, _ in counted], "discounted": discounted,
                      "quorum": quorum}
            if row.status == "approved" and len(counted) < quorum:
                audit.append(session, event="recovery.release_refused", outcome="denied", actor=officer,
                             subject=row.target_email, now=now, detail=detail)
                gone = "; ".join(f"{d['officer']}: {d['why']}" for d in discounted)
                return RecoveryNotReady(f"recovery request {request_id} has {len(counted)} approvals by current "
                                        f"officers; {quorum} are needed (no longer counting: {gone})"), None
            if not claim_release(session, request_id, now):
                return RecoveryNotReady(f"recovery request {request_id} is {row.status}: it needs "
                                        f"{quorum} approvals and is released once"), None
            audit.append(session, event="recovery.released", outcome="done", actor=officer,
                         subject=row.target_email, now=now, detail=detail)
            approvals = [e for _, e in counted]  # only what still counts goes to the KRA
            return None, (row.target_email, list(row.serials), (row.evidence or b"", *approvals, request.raw))

        error, released = self.db.run(work)
        if error is not None:
            raise error
        target, serials, evidence = released
        grant = RecoveryGrant(kind="officers", email=target, actor=officer, request_id=request_id,
                              evidence=tuple(e for e in evidence if e))
        certs = certificates_by_serials(self.db, serials)
        keys = [self._package(certs[s], grant, password, legacy, now) for s in serials if s in certs]
        return {**self.view(request_id, now), "keys": keys}

    def show(self, request: VerifiedRequest, request_id: str) -> dict:
        self._officer(request)
        return self.view(request_id)

    def view(self, request_id: str, now: datetime | None = None) -> dict:
        now = now or datetime.now(timezone.utc)
        with self.db.transaction() as session:
            row = self._load(session, request_id, now)
            approvals = approvals_of(session, request_id)
            body = {"id": row.id, "status": row.status, "requester": row.requester, "email": row.target_email,
                    "serials": row.serials, "reason": row.reason, "approvals": [o for o, _ in approvals],
                    "quorum": self.settings.recovery_quorum, "expires_at": row.expires_at.isoformat()}
        # `approvals` lists every approval recorded; `discounted` those that would not count at a release now.
        body["discounted"] = self._standing(approvals, now)[1]
        return body

    def list_requests(self, now: datetime | None = None) -> list[dict]:
        ids = recovery_request_ids(self.db)
        return [self.view(i, now) for i in ids]
