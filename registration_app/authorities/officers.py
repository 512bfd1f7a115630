"""Who counts as a recovery officer *now*: the rule every m-of-n release applies to every approval.

An approval is a signed request made at one moment; the officer may since have left the officers'
group, or their certificate may have expired or been revoked. At release (and again where the key is
unwrapped: the local KRA, or the KRA service verifying the evidence itself) each approval counts only
if its signer is still a member of `recovery_officers_group`, read live from LDAP, and the certificate
that signed it is still valid and not revoked. Approvals that no longer count are reported with the
reason, for `officer show` and the audit log.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from ..core.dn import dn_key
from ..core.errors import AmbiguousUser
from ..core.ports import Directory

NOT_AN_OFFICER = "not an officer"
NO_ENTRY = "no directory entry"
SEVERAL_ENTRIES = "the address is on several directory entries"
CERTIFICATE_REVOKED = "certificate revoked"
CERTIFICATE_EXPIRED = "certificate expired"
NO_EVIDENCE = "no signed approval on record"


def signer_certificate(jws: bytes | None) -> x509.Certificate | None:
    """The leaf certificate of a stored signed request (its `x5c`), or None if it has none readable. The
    signature was verified when the request was made; here only the certificate's standing matters."""
    if not jws:
        return None
    try:
        protected = json.loads(jws)["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        return x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0], validate=True))
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
        return None


def signer_email(jws: bytes | None) -> str | None:
    """The email address of a stored signed request's certificate (for reports), or None."""
    cert = signer_certificate(jws)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value if cert else None
    except x509.ExtensionNotFound:
        return None
    emails = names.get_values_for_type(x509.RFC822Name) if names is not None else []
    return emails[0].lower() if emails else None


@dataclass(frozen=True)
class OfficerRoster:
    """The officers' group in LDAP and the CA's revocation status, both read on every question."""

    directory: Directory
    group: str
    is_revoked: Callable[[x509.Certificate], bool]

    def is_officer(self, email: str) -> bool:
        return self.membership(email) is None

    def membership(self, email: str) -> str | None:
        """None if `email` is a member of the group now; otherwise why not."""
        try:
            user = self.directory.find_user(email)
        except AmbiguousUser:
            return SEVERAL_ENTRIES
        if user is None:
            return NO_ENTRY
        if dn_key(self.group) not in {dn_key(g) for g in self.directory.groups_of(user)}:
            return NOT_AN_OFFICER
        return None

    def why_not_counted(self, email: str, certificate: x509.Certificate | None, now: datetime) -> str | None:
        """None if an approval by `email`, signed with `certificate`, counts at `now`; otherwise why not."""
        if certificate is None:
            return NO_EVIDENCE
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            return CERTIFICATE_EXPIRED
        if self.is_revoked(certificate):
            return CERTIFICATE_REVOKED
        return self.membership(email)
