"""The HTTP status of every error code: the one table (core errors carry a code and a message only).

A code missing here (an error class added without its row) answers with the status of the nearest
class above it that has one, and a test holds every code of the tree to a row of its own."""

from __future__ import annotations

from ..core.errors import AutoenrollError

STATUS_OF_CODE: dict[str, int] = {
    # request shape
    "bad_request": 400, "malformed_json": 400, "malformed_jws": 400, "bad_algorithm": 400,
    "malformed_csr": 400, "weak_key": 400, "body_too_large": 413, "wrong_content_type": 415,
    # authentication
    "unauthenticated": 401, "no_client_certificate": 401, "bad_client_certificate": 401,
    "bad_signature": 401, "untrusted_chain": 401, "wrong_key_usage": 401, "certificate_expired": 401,
    "certificate_revoked": 401, "certificate_superseded": 401, "bad_nonce": 401, "url_mismatch": 401,
    "binding_mismatch": 401, "bad_enrollment_code": 401,
    # authorisation
    "forbidden": 403, "agent_not_allowed": 403, "agent_revoked": 403, "not_entitled": 403,
    "csr_mismatch": 403, "not_owner": 403, "not_officer": 403, "anchor_not_allowed": 403,
    "certificate_not_listed": 403, "own_ca_required": 403, "not_requester": 403, "entry_changed": 403,
    "self_approval": 403, "evidence_refused": 403,
    # lookups and conflicts
    "not_found": 404, "unknown_profile": 404, "user_not_found": 404, "unknown_certificate": 404,
    "conflict": 409, "ambiguous_user": 409, "already_exists": 409, "already_approved": 409,
    "recovery_not_ready": 409, "recovery_expired": 409, "rate_limited": 429,
    # dependencies
    "unavailable": 503, "directory_unavailable": 503, "directory_tls_failed": 503, "schema_refused": 503, "database_unavailable": 503,
    "revocation_unavailable": 503, "escrow_failed": 503, "key_store_unavailable": 503,
    # bugs and misconfiguration
    "internal": 500, "config_error": 500, "escrow_integrity": 500, "duplicate_record": 500,
}


def status_of(error: AutoenrollError) -> int:
    """The HTTP status that answers `error`: its code's row, else its nearest ancestor's."""
    status = STATUS_OF_CODE.get(error.code)
    if status is not None:
        return status
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in STATUS_OF_CODE:
            return STATUS_OF_CODE[code]
    return 500
