"""Certificate revocation lists (RFC 5280 §5), signed by the S/MIME CA."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from cryptography import x509

from .certs import authority_key_identifier, sign_with_ca_key


def build_crl(
    *,
    ca_cert: x509.Certificate,
    ca_key,
    revoked: Iterable[tuple[int, datetime, x509.ReasonFlags | None]],
    number: int,
    now: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A full CRL listing `revoked` (serial, revocation time, reason), with CRL number and AKI.

    The reasonCode entry extension is left out for `unspecified` and None, as RFC 5280 §5.3.1 asks.
    `number` must grow with every CRL the CA publishes (the caller keeps the counter).
    """
    this_update = _utc(now)
    next_update = _utc(next_update)
    if next_update <= this_update:
        raise ValueError("next_update must be after now")
    if number < 0:
        raise ValueError("the CRL number must not be negative")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_identifier(ca_cert), critical=False)
    )
    for serial, revoked_at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_utc(revoked_at))
        if reason is not None and reason is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return sign_with_ca_key(builder, ca_key)


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return when.astimezone(timezone.utc).replace(microsecond=0)
