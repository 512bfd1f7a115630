"""The registration authority: what happens between an authenticated request and the key authority.

The web layer authenticates (agent by TLS, user by JWS) and hands over a VerifiedRequest; this
module decides (profile, entitlement from LDAP, renewal policy, rate limits), asks the key
authority, and tries the directory once inline. It knows nothing of HTTP.
"""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import dataclass
from typing import Any, cast
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.serialization import Encoding

from ..auth.anchors import user_entry
from ..auth.csr import verify_csr
from ..auth import nonces
from ..auth.nonces import NonceToken
from ..auth.request_checks import RequestChecks
from ..authorities.key_authority import Decision, IssueRequest, Issued, SplitKeyAuthority
from ..core.dn import dn_key
from ..core.entitlement import is_entitled
from ..core.errors import (AutoenrollError, BadEnrollmentCode, BadRequest, Conflict, EntryChanged,
                          KeyStoreUnavailable, NotEntitled, RateLimited, UnknownCertificate, UserNotFound)
from ..core.model import AgentIdentity, KeySource, Profile, Usage, UserEntry, UserIdentity, VerifiedRequest
from ..core.ports import Directory
from ..settings import Settings
from ..core.profiles import get_profile
from ..core.renewal import server_window_opens
from ..store import audit
from ..store.db import Database
from ..store.repos import (BootstrapLimits, bind_rows_to_entry, bootstrap_retry_after, certificate_by_serial,
                          certificate_histories, current_certificate, enrollment_code, enrollment_code_key,
                          entry_binding, latest_certificate, move_entry_rows, record_bootstrap_failure,
                          use_enrollment_code)

log = logging.getLogger("autoenroll.ra")

MAX_PASSWORD = 1024
# The one answer to every bad enrollment code, whatever was wrong with it: unknown id, wrong MAC, used,
# burnt, expired. A different answer per case would tell a guesser which code ids exist.
BAD_CODE = "the enrollment code is unknown, used, expired or wrong; ask for a new one"
SELF_REVOCATION_REASONS = {"unspecified", "keyCompromise", "affiliationChanged", "superseded",
                           "cessationOfOperation"}


def check_same_entry(db: Database, certificate: UserIdentity, user: UserEntry, *, actor: str,
                     checks: RequestChecks | None = None) -> None:
    """Refuse a request signed with a certificate of ours that was issued to another directory entry
    than `user`, the entry that holds its address now (EntryChanged, 403): an address given to someone
    else does not take the old holder's certificates along.

    The entry is the same when its stable id is (LdapSettings.entry_id_attribute). An entry renamed or
    moved to another DN is followed: its certificate rows take the new DN. A row older than migration
    0006 has no id yet: the first request that finds its entry at the row's DN binds every row of that
    DN to it (first sight); found under another DN it is refused, until reconcile has followed it.
    Certificates of other issuers are bound to their entry by the entry listing them (auth/chain.py).
    `checks` (the request's read-ahead) answers without a statement of its own."""
    if not certificate.issuer_is_ours or not user.entry_id:
        return
    serial = format(certificate.serial, "x")
    binding = checks.entry_binding(certificate.serial) if checks is not None else entry_binding(db, serial)
    if binding is None:
        return
    entry_id, user_dn = binding
    same_dn = dn_key(user_dn) == dn_key(user.dn)
    if entry_id is None and same_dn:
        bind_rows_to_entry(db, user_dn, user.entry_id)
        return
    if entry_id != user.entry_id:
        raise EntryChanged(f"certificate {serial} was issued to another directory entry than {user.dn}, which "
                           f"now has the address {user.email}; the holder of that entry needs their own "
                           "certificate (an enrollment code)")
    if not same_dn:  # renamed (modrdn) or moved to another OU: the same entry, under its new DN
        def follow(conn):
            serials = move_entry_rows(conn, entry_id, user.dn)
            audit.append(conn, event="directory.user_moved", outcome="done", actor=actor, subject=user.email,
                         detail={"from": user_dn, "to": user.dn, "serials": serials, "entry_id": entry_id})
        db.run(follow, core=True)


def _pem(cert) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def _optional(payload: dict, name: str, kind: type, default=None):
    value = payload.get(name, default)
    if value is not default and not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be a {kind.__name__}")
    return value


def _nonce_of(request: VerifiedRequest) -> NonceToken | None:
    # core's VerifiedRequest cannot name auth's NonceToken; web/api.py puts one there (or None)
    return cast("NonceToken | None", request.nonce)


def _checks_of(request: VerifiedRequest) -> RequestChecks | None:
    # core's VerifiedRequest cannot name auth's RequestChecks; web/api.py puts one there (or None)
    return cast("RequestChecks | None", request.checks)


@dataclass(frozen=True)
class Refusal:
    """A refused API request, as the web layer saw it: who asked, for whom, where, and why."""

    actor: str
    subject: str
    path: str
    code: str
    reason: str
    request_id: str | None = None
    nonce: NonceToken | None = None


@dataclass
class RegistrationAuthority:
    settings: Settings
    db: Database
    directory: Directory
    key_authority: SplitKeyAuthority  # LocalKeyAuthority in role all
    # directory_sync's Publisher, or RemotePublisher in role ra; untyped until publication has a Protocol
    publisher: Any

    # -- entitlement --------------------------------------------------------------------------
    def entitled_user(self, email: str, profile: Profile, actor: str, *,
                      deferred_audit: list[dict] | None = None, identity: UserIdentity | None = None,
                      checks: RequestChecks | None = None) -> UserEntry:
        """The user's entry, read live, if a group of theirs is entitled to `profile`. The
        enrollment.allowed audit row is committed now, or appended to `deferred_audit` (a list) for
        the caller to commit with the certificate. With `identity` (who signed the request), a
        certificate of another trust anchor must be listed by that entry (auth/anchors.py), and one of
        ours must have been issued to that entry (check_same_entry)."""
        user = self.check_entitlement(email, profile, identity=identity, actor=actor, checks=checks)
        allowed: dict[str, Any] = dict(event="enrollment.allowed", outcome="allowed", actor=actor, subject=email,
                       detail={"profile": profile.name, "dn": user.dn})
        if deferred_audit is not None:
            deferred_audit.append(allowed)
        else:
            self.db.run(lambda s: audit.append(s, **allowed))
        return user

    def check_entitlement(self, email: str, profile: Profile, *, identity: UserIdentity | None = None,
                          actor: str = "registration authority", checks: RequestChecks | None = None) -> UserEntry:
        """The user's entry, read live, or NotEntitled: the one rule of every step (invite, bootstrap,
        enroll; reconcile and provision apply the same is_entitled)."""
        user = user_entry(self.directory, identity) if identity is not None else self.directory.find_user(email)
        if user is None:
            raise UserNotFound(f"no directory entry has the email address {email!r}")
        if identity is not None:
            check_same_entry(self.db, identity, user, actor=actor, checks=checks)
        if not is_entitled(profile, self.directory.groups_of(user)):
            groups = ", ".join(sorted(profile.groups)) or "none"
            raise NotEntitled(f"{email} is not a member of a group entitled to profile {profile.name!r} "
                              f"(entitled groups: {groups})", profile=profile.name)
        return user

    def refused(self, refusal: "Refusal") -> None:
        """Every refused API request is one audit row (who asked, what for, why refused), with the
        request's nonce used in the same transaction (checked, not yet used: a refused request uses it
        too): refusals by our own checks and by the HTTP layer (413 body too large, 404, 405) alike. The
        refusal stands even when the audit store is down: then the log says so.

        A request the key store (HSM) failed is not a refusal but is audited here the same way, as
        `key_store.unavailable` (nothing was signed, unwrapped or recorded before it:
        authorities/pkcs11_store.py); its nonce stays unused, so the agent may send it again."""
        failed = refusal.code == KeyStoreUnavailable.code

        def work(conn):
            if refusal.nonce is not None and not failed:
                nonces.spend_if_unused(conn, refusal.nonce)  # the request it came with may have used it
            audit.append(conn, event="key_store.unavailable" if failed else "request.denied",
                         outcome="failed" if failed else "denied", actor=refusal.actor,
                         subject=refusal.subject, detail={"path": refusal.path, "code": refusal.code,
                                                          "reason": refusal.reason[:300],
                                                          "request_id": refusal.request_id})

        try:
            self.db.run(work, core=True)
        except Exception:
            log.exception("event=audit.write_failed request_id=%s", refusal.request_id)

    # -- policy ---------------------------------------------------------------------------------
    def _replacement_of(self, email: str, profile: Profile, replace: bool, renews: str | None,
                        now: datetime, entry_id: str = "") -> str | None:
        """The serial the new certificate replaces; refuses when policy says not now.

        `renews` (a serial) makes a renewal idempotent across retries and daemons: it succeeds only
        while that serial is still the current one, so the same certificate is never renewed twice.
        """
        others = self._other_encryption_profiles(profile)
        histories = certificate_histories(self.db, email, [profile.name, *others])  # one statement for all
        history = histories[profile.name]
        since = now - timedelta(days=1)
        if sum(1 for c in history if c.issued_at >= since) >= profile.max_per_day:
            raise RateLimited(f"at most {profile.max_per_day} certificates a day for profile "
                              f"{profile.name!r}; try again later", retry_after=3600)
        current = next((c for c in history if c.status == "valid"), None)
        # What this entry's new certificate replaces is its own latest one, never another entry's that
        # held the address before (rows without an entry id predate ids: they count as this entry's).
        latest = next((c for c in history if not (c.entry_id and entry_id and c.entry_id != entry_id)), None)
        if current is not None and current.entry_id and entry_id and current.entry_id != entry_id:
            # The address was given to this entry while another entry's certificate for it is current:
            # never replace (supersede) someone else's certificate; reconcile revokes it.
            raise Conflict(f"{email} now belongs to another directory entry than its current {profile.name!r} "
                           f"certificate {current.serial}; `autoenroll sync reconcile` ends that certificate "
                           "first", serial=current.serial)
        if renews is not None and (current is None or current.serial != renews.lower()):
            newer = f"; the current one is {current.serial}" if current is not None else ""
            raise Conflict(f"certificate {renews} is not the current {profile.name!r} certificate of {email} "
                           f"(already renewed, revoked or unknown){newer}",
                           current=current.serial if current else "")
        if current is not None and not replace:
            opens = server_window_opens(current.not_before, current.not_after, profile.renew_window_days)
            if now < opens:
                raise Conflict(
                    f"{email} already has a current {profile.name!r} certificate (serial {current.serial}, "
                    f"valid until {current.not_after:%Y-%m-%d}); renewal opens on {opens:%Y-%m-%d}, "
                    "or ask for a replacement explicitly (replace: true)", serial=current.serial)
        if current is None:  # a renewal keeps the user's encryption certificate one; a new one may not make two
            other = self._other_encryption(email, others, histories, replace, now, entry_id)
            if other is not None:  # an explicit replacement supersedes the other profile's certificate
                return other
        return latest.serial if latest is not None else None

    def _other_encryption_profiles(self, profile: Profile) -> list[str]:
        """The other encryption profiles whose current certificate an enrollment of `profile` must
        mind (`_other_encryption`); none for a signature profile or one with `coexist = true`."""
        if profile.usage is not Usage.ENCRYPTION or profile.coexist:
            return []
        return [other.name for other in self.settings.profiles.values()
                if other.name != profile.name and other.usage is Usage.ENCRYPTION and not other.coexist]

    def _other_encryption(self, email: str, others: list[str], histories: dict[str, list], replace: bool,
                          now: datetime, entry_id: str = "") -> str | None:
        """At most one current encryption certificate per user: mail clients pick one certificate per
        address. The serial of the user's current certificate of another encryption profile (`others`,
        their `histories`), which an explicit replacement supersedes; without `replace` such an
        enrollment is refused. An expired one (still 'valid' in our records) is superseded without
        asking: it holds the address's slot in the database's index (store/models.py `encryption_slot`)
        until it is. Profiles with `coexist = true` are outside this rule.

        Like `_replacement_of`, never another entry's (`entry_id`): a certificate issued to the entry that
        held the address before is refused, replace or not, until reconcile revokes it (it holds the slot)."""
        expired = None
        for other in others:
            valid = [c for c in histories[other] if c.status == "valid"]
            foreign = next((c for c in valid if c.entry_id and entry_id and c.entry_id != entry_id), None)
            if foreign is not None:
                raise Conflict(f"{email} now belongs to another directory entry than its current {other!r} "
                               f"certificate {foreign.serial}; `autoenroll sync reconcile` ends that certificate "
                               "first", serial=foreign.serial, profile=other)
            current = next((c for c in valid if _aware(c.not_after) > now), None)
            if current is None:
                expired = expired or next(iter(valid), None)
                continue
            if not replace:
                raise Conflict(
                    f"{email} already has a current encryption certificate of profile {other!r} (serial "
                    f"{current.serial}); a user holds one encryption certificate at a time: renew that one, or "
                    f"ask for a replacement explicitly (replace: true), which supersedes it",
                    serial=current.serial, profile=other)
            return current.serial
        return expired.serial if expired is not None else None

    def _password(self, payload: dict) -> str | None:
        password = _optional(payload, "password", str)
        if password is not None and not 1 <= len(password) <= MAX_PASSWORD:
            raise BadRequest(f"the PKCS#12 password must be 1 to {MAX_PASSWORD} characters")
        return password

    # -- the cases ------------------------------------------------------------------------------
    def enroll(self, request: VerifiedRequest, now: datetime | None = None) -> dict:
        """signature → encryption, expiring signature → replacement signature, replacement encryption."""
        now = now or datetime.now(timezone.utc)
        payload, actor = request.payload, request.agent.subject
        profile = get_profile(self.settings.profiles,
                              payload.get("profile", self.settings.default_encryption_profile))
        replace = _optional(payload, "replace", bool, False)
        renews = _optional(payload, "renews", str)
        legacy = _optional(payload, "pkcs12_legacy", bool, False)
        csr_text = _optional(payload, "csr", str)
        password = self._password(payload)
        email = request.user.email
        if csr_text is not None and profile.key_source is KeySource.SERVER:
            raise BadRequest(f"profile {profile.name!r} keys are generated by the key authority; send no csr")
        if csr_text is None and profile.key_source is KeySource.CLIENT:
            raise BadRequest(f"profile {profile.name!r} needs a csr: the key is generated by the agent")
        if csr_text is None and password is None:
            raise BadRequest("a password for the PKCS#12 is required when the server generates the key")
        csr = verify_csr(csr_text, email=email) if csr_text is not None else None

        # enrollment.allowed and the request's nonce are the RA's decision, which the key authority
        # commits (the local one in the issuance's one transaction). Any way out before that writes the
        # rows alone (a refusal's nonce is used with its request.denied row: `refused`).
        decision = Decision(nonce=_nonce_of(request), publish_inline=True)
        user = self.entitled_user(email, profile, actor, deferred_audit=decision.audit_events, identity=request.user,
                                  checks=_checks_of(request))
        try:
            if renews is not None and csr is not None:
                earlier = self._earlier_renewal(email, profile, renews, csr)
                if earlier is not None:  # a retry after a lost answer: same key, same certificate
                    decision.commit(self.db, now)
                    return earlier
            replaces = self._replacement_of(email, profile, replace, renews, now, user.entry_id)
        except BaseException:
            decision.commit_rows_only(self.db, now)
            raise
        issued = self.key_authority.issue(IssueRequest(
            user=user, profile=profile, actor=actor, password=password, csr=csr, replaces=replaces,
            legacy_pkcs12=legacy), now=now, decision=decision)
        return self._response(issued, profile, user)

    # -- bootstrap: enrollment codes ------------------------------------------------------------
    def _bootstrap_limits(self) -> BootstrapLimits:
        s = self.settings
        return BootstrapLimits(per_code=s.enrollment_code_max_failures, per_agent=s.bootstrap_failures_per_agent,
                               window=timedelta(seconds=s.bootstrap_failure_window_seconds))

    def bootstrap_key(self, code_id: str, agent: AgentIdentity, now: datetime | None = None) -> bytes:
        """The MAC key to check a bootstrap request with: the code's, or a random one for an unknown,
        used, burnt or expired id, so that every bad code fails the same check with the same answer.
        Refused (429) while this code id or this agent has too many recent failures."""
        retry_after = bootstrap_retry_after(self.db, code_id, agent.subject, self._bootstrap_limits(), now)
        if retry_after is not None:
            raise RateLimited(f"too many wrong enrollment codes; try again in {retry_after} s",
                              retry_after=retry_after)
        found = enrollment_code_key(self.db, code_id, now)
        return found[1] if found is not None else secrets.token_bytes(32)

    def bootstrap_failed(self, code_id: str, agent: AgentIdentity, now: datetime | None = None) -> None:
        """A bootstrap request whose MAC did not verify: counted (a real code burns at the limit, audited)."""
        if record_bootstrap_failure(self.db, code_id, agent.subject, self._bootstrap_limits(), now):
            log.warning("event=enrollment_code.burnt code_id=%s agent=%r", code_id[:32], agent.subject)

    def bootstrap(self, payload: dict, code_id: str, agent: AgentIdentity, now: datetime | None = None, *,
                  check_agent=lambda email: None) -> dict:
        """An invited user's first signature certificate, from an agent-generated CSR. `check_agent`
        refuses an agent scoped to other mail domains: only after the MAC verified, so that it tells
        nothing about codes the caller does not hold."""
        now = now or datetime.now(timezone.utc)
        code = enrollment_code(self.db, code_id, now)
        if code is None:  # used, burnt or expired since its MAC was checked
            raise BadEnrollmentCode(BAD_CODE)
        check_agent(code.email)
        csr_text = _optional(payload, "csr", str)
        if csr_text is None:
            raise BadRequest("field 'csr' is required")
        csr = verify_csr(csr_text, email=code.email)
        profile = get_profile(self.settings.profiles, self.settings.bootstrap_profile)
        # Checked again here (invite checked it): membership may have changed since. A refusal leaves
        # the code unused, for when the user is entitled.
        user = self.check_entitlement(code.email, profile)

        def burn(session):
            if not use_enrollment_code(session, code_id, now):
                raise BadEnrollmentCode(BAD_CODE)
            audit.append(session, event="bootstrap.allowed", outcome="allowed", actor=agent.subject,
                         subject=code.email, now=now, detail={"code_id": code_id})

        self.db.run(burn)
        with self.db.read() as session:
            latest = latest_certificate(session, code.email, profile.name)
        if latest is not None and latest.entry_id and user.entry_id and latest.entry_id != user.entry_id:
            latest = None  # another entry held the address before: its certificates are not this one's to replace
        issued = self.key_authority.issue(IssueRequest(
            user=user, profile=profile, actor=agent.subject, csr=csr,
            replaces=latest.serial if latest else None), now=now)
        return self._response(issued, profile, user)

    def _earlier_renewal(self, email: str, profile: Profile, renews: str, csr) -> dict | None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import PublicFormat
        with self.db.read() as session:
            current = current_certificate(session, email, profile.name)
        if current is None or current.replaces != renews.lower():
            return None
        cert = x509.load_der_x509_certificate(current.der)
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != csr.public_key().public_bytes(*spki):
            return None
        return {"serial": current.serial, "profile": profile.name, "usage": profile.usage.value,
                "email": current.email, "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(), "certificate": _pem(cert),
                "chain": [_pem(c) for c in self.key_authority.ca.chain], "escrowed": False,
                "published": not self.publisher.pending(current.user_dn), "repeated": True}

    def revoke_own(self, request: VerifiedRequest, now: datetime | None = None) -> dict:
        """A user revokes one of their own certificates (for example keyCompromise)."""
        from cryptography import x509
        payload = request.payload
        serial = _optional(payload, "serial", str)
        reason = _optional(payload, "reason", str, "unspecified")
        if not serial or len(serial) > 48:
            raise BadRequest("field 'serial' (hex) is required")
        if reason not in SELF_REVOCATION_REASONS:
            raise BadRequest(f"reason must be one of {', '.join(sorted(SELF_REVOCATION_REASONS))}")
        user = user_entry(self.directory, request.user)
        check_same_entry(self.db, request.user, user, actor=request.agent.subject, checks=_checks_of(request))
        serial = serial.lower().removeprefix("0x")
        cert = certificate_by_serial(self.db, serial)
        # Someone else's serial is answered as a serial that does not exist: the answer must not tell
        # which serials are ours to other users (an ownership oracle).
        if cert is None or cert.email.lower() != user.email.lower() or cert.user_dn != user.dn:
            raise UnknownCertificate(f"{user.email} has no certificate with serial {serial}")
        changed = self.key_authority.ca.revoke(serial, x509.ReasonFlags(reason),
                                               actor=f"{request.agent.subject} for {user.email}", now=now)
        return {"serial": serial, "status": "revoked", "reason": reason, "changed": changed,
                "published": self.publish_now(user.dn)}

    def _response(self, issued: Issued, profile: Profile, user: UserEntry) -> dict:
        published = self.publish_now(user.dn, issued, entry=user)
        body = {
            "serial": issued.serial,
            "profile": profile.name,
            "usage": profile.usage.value,
            "email": user.email,
            "not_before": issued.certificate.not_valid_before_utc.isoformat(),
            "not_after": issued.certificate.not_valid_after_utc.isoformat(),
            "certificate": _pem(issued.certificate),
            "chain": [_pem(c) for c in issued.chain],
            "escrowed": issued.escrowed,
            "published": published,
        }
        if issued.pkcs12 is not None:
            body["pkcs12"] = base64.b64encode(issued.pkcs12).decode()
        return body

    def publish_now(self, user_dn: str, issued: Issued | None = None, *, entry: UserEntry | None = None) -> bool:
        """Try the directory once, inline; on failure the outbox keeps the rows for the worker. After
        a local issuance, its outbox row, the user's certificates read with it and the user's entry
        as this request read it are all it needs."""
        try:
            if issued is not None and issued.outbox is not None and issued.user_certificates is not None:
                return self.publisher.publish_user_now(user_dn, rows=[issued.outbox],
                                                       certs=issued.user_certificates, entry=entry)
            return self.publisher.publish_user_now(user_dn)
        except AutoenrollError as exc:  # a remote CA that cannot be reached: the worker retries
            log.warning("event=publish.deferred dn=%r error=%r", user_dn, exc.detail)
            return False
