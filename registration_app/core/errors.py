"""One error tree. Each class has a stable `code` and a public message (`title`, `detail`).

The web layer turns any AutoenrollError into an RFC 9457 problem document in one place
(registration_app/web/errors.py), with the HTTP status of its code from one table
(registration_app/web/status.py). Messages are safe to show to the caller: never put key
material, passwords or internal paths in them.
"""

from __future__ import annotations


class AutoenrollError(Exception):
    code = "internal"
    title = "Internal error"

    def __init__(self, detail: str | None = None, **extra: object) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)


# --- request shape -----------------------------------------------------------------------
class BadRequest(AutoenrollError):
    code, title = "bad_request", "Malformed request"


class MalformedJSON(BadRequest):
    code, title = "malformed_json", "The body is not valid JSON"


class MalformedJWS(BadRequest):
    code, title = "malformed_jws", "The body is not a valid flattened JWS"


class UnsupportedAlgorithm(BadRequest):
    code, title = "bad_algorithm", "The JWS algorithm is not allowed"


class MalformedCSR(BadRequest):
    code, title = "malformed_csr", "The certificate signing request is not valid"


class WeakKey(BadRequest):
    """A public key outside the one key policy (auth/keypolicy.py): RSA of at least 2048 bits, EC on
    P-256, P-384 or P-521; for every key the server accepts (x5c chain, CSR, agent TLS certificate)."""

    code, title = "weak_key", "The key does not meet the key policy"


class BodyTooLarge(AutoenrollError):
    code, title = "body_too_large", "The request body is too large"


class WrongContentType(AutoenrollError):
    code, title = "wrong_content_type", "Unsupported content type"


# --- authentication ----------------------------------------------------------------------
class Unauthenticated(AutoenrollError):
    code, title = "unauthenticated", "Authentication failed"


class NoClientCertificate(Unauthenticated):
    code, title = "no_client_certificate", "A TLS client certificate is required"


class BadClientCertificate(Unauthenticated):
    code, title = "bad_client_certificate", "The TLS client certificate is not trusted"


class BadSignature(Unauthenticated):
    code, title = "bad_signature", "The JWS signature does not verify"


class UntrustedChain(Unauthenticated):
    code, title = "untrusted_chain", "The user certificate does not chain to a trusted CA"


class WrongKeyUsage(UntrustedChain):
    """The chain may be fine: the certificate is not one that signs requests (an encryption certificate)."""
    code, title = "wrong_key_usage", "The user certificate's key usage does not allow signing requests"


class CertificateExpired(Unauthenticated):
    code, title = "certificate_expired", "The user certificate has expired or is not yet valid"


class CertificateRevoked(Unauthenticated):
    code, title = "certificate_revoked", "The user certificate has been revoked"


class CertificateSuperseded(Unauthenticated):
    code, title = "certificate_superseded", "The user certificate has been replaced by a newer one"


class BadNonce(Unauthenticated):
    code, title = "bad_nonce", "The nonce is unknown, expired or already used"


class UrlMismatch(Unauthenticated):
    code, title = "url_mismatch", "The signed url does not match the request URL"


class BindingMismatch(Unauthenticated):
    code, title = "binding_mismatch", "The request is bound to another TLS client certificate"


class BadEnrollmentCode(Unauthenticated):
    code, title = "bad_enrollment_code", "The enrollment code is unknown, used or expired"


# --- authorisation -----------------------------------------------------------------------
class Forbidden(AutoenrollError):
    code, title = "forbidden", "Not allowed"


class AgentNotAllowed(Forbidden):
    code, title = "agent_not_allowed", "This user server is not allowed to act for users"


class AgentRevoked(AgentNotAllowed):
    code, title = "agent_revoked", "This user server's certificate has been revoked"


class NotEntitled(Forbidden):
    code, title = "not_entitled", "The user is not entitled to this profile"


class CsrMismatch(Forbidden):
    code, title = "csr_mismatch", "The CSR does not match the authenticated user"


class NotOwner(Forbidden):
    code, title = "not_owner", "The certificate does not belong to this user"


class NotOfficer(Forbidden):
    code, title = "not_officer", "Only recovery officers may do this"


class AnchorNotAllowed(Forbidden):
    code, title = "anchor_not_allowed", "The certificate's CA may not vouch for this mail address"


class CertificateNotListed(Forbidden):
    code, title = "certificate_not_listed", "The directory entry does not list this certificate"


class OwnCaRequired(Forbidden):
    code, title = "own_ca_required", "This needs a signature certificate from this server's CA"


class NotRequester(Forbidden):
    code, title = "not_requester", "Only the officer who opened the recovery request can release it"


class EntryChanged(Forbidden):
    code, title = "entry_changed", "The certificate belongs to another directory entry than the address's"


# --- lookups and conflicts ---------------------------------------------------------------
class NotFound(AutoenrollError):
    code, title = "not_found", "Not found"


class UnknownProfile(NotFound):
    code, title = "unknown_profile", "No such profile"


class UserNotFound(NotFound):
    code, title = "user_not_found", "No directory entry has this email address"


class UnknownCertificate(NotFound):
    code, title = "unknown_certificate", "No such certificate"


class Conflict(AutoenrollError):
    code, title = "conflict", "Conflict"


class AmbiguousUser(Conflict):
    code, title = "ambiguous_user", "Several directory entries have this email address"


class AlreadyExists(Conflict):
    code, title = "already_exists", "Refusing to overwrite existing material"


class RateLimited(AutoenrollError):
    code, title = "rate_limited", "Too many requests"

    def __init__(self, detail: str | None = None, retry_after: int = 60, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


# --- dependencies ------------------------------------------------------------------------
class Unavailable(AutoenrollError):
    code, title = "unavailable", "A dependency is unavailable; try again later"


class DirectoryUnavailable(Unavailable):
    code, title = "directory_unavailable", "The LDAP directory is unavailable"


class DirectoryTlsFailed(DirectoryUnavailable):
    """The TLS connection to the directory failed for a reason an operator must fix (certificate not
    verified, name mismatch, StartTLS refused): `autoenroll serve` refuses to start on it."""

    code, title = "directory_tls_failed", "The TLS connection to the LDAP directory failed"


class SchemaRefused(DirectoryUnavailable):
    """The directory refuses the certificate attribute on this entry for good (its object classes do not
    allow it and the auxiliary class could not be added, or the value is too large): the outbox row
    ends in the `schema_refused` state with the directory's message instead of being retried."""

    code, title = "schema_refused", "The directory's schema refuses the certificate on this entry"


class DatabaseUnavailable(Unavailable):
    """`cause` is what the database driver said: for the operator's log and command line, never for a
    caller over HTTP (it names hosts and ports)."""

    code, title = "database_unavailable", "The database is unavailable"

    def __init__(self, detail: str | None = None, cause: str = "", **extra: object) -> None:
        super().__init__(detail, **extra)
        self.cause = cause


class RevocationUnavailable(Unavailable):
    code, title = "revocation_unavailable", "The revocation status of the certificate cannot be checked now"

    def __init__(self, detail: str | None = None, retry_after: int = 30, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class KeyStoreUnavailable(Unavailable):
    """The token (HSM) holding a CA or KRA key failed: nothing was signed, unwrapped or recorded."""
    code, title = "key_store_unavailable", "The key store (HSM) is unavailable; nothing was issued"

    def __init__(self, detail: str | None = None, retry_after: int = 10, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class EscrowFailed(Unavailable):
    code, title = "escrow_failed", "The key could not be escrowed; nothing was issued"


class DuplicateRecord(AutoenrollError):
    """The database refused a write that would break one of its constraints (store/errors.py names
    which in `constraint`): a race the caller lost when the caller says so, otherwise a fault."""

    code, title = "duplicate_record", "The record exists already"

    def __init__(self, detail: str | None = None, constraint: str = "", **extra: object) -> None:
        super().__init__(detail, **extra)
        self.constraint = constraint


class ConfigError(AutoenrollError):
    code, title = "config_error", "Configuration error"


# --- recovery ----------------------------------------------------------------------------
class SelfApproval(Forbidden):
    code, title = "self_approval", "An officer cannot approve their own recovery request"


class AlreadyApproved(Conflict):
    code, title = "already_approved", "This officer already approved the request"


class RecoveryNotReady(Conflict):
    code, title = "recovery_not_ready", "The recovery request is not in a state that allows this"


class RecoveryExpired(Conflict):
    code, title = "recovery_expired", "The recovery request has expired"
