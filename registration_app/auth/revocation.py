"""Revocation of certificates from external trust anchors, by CRL over HTTP (RFC 5280 §4.2.1.13, §6.3).

Our own CA's certificates are looked up in our database (authorities/ca.py `is_revoked`); a partner CA or
a national eID publishes a CRL at the distribution point named in each certificate. This module fetches
it, verifies it against the certificate's issuer (name, signature, cRLSign, dates; no delta CRLs), and
caches it per process: a CRL is used until its nextUpdate, and never longer than the anchor's
`max_crl_age` after it was fetched, after which it is fetched again.

Fail closed: when no distribution point gives a usable CRL, the request is refused with 503
`revocation_unavailable` (a dependency is down: the agent retries later, the certificate itself may be
fine, so a 401 would wrongly tell the user their credential is bad). A certificate that names no HTTP
distribution point can never be checked: that is a 401 `untrusted_chain`. Only an anchor configured with
the explicitly insecure `revocation = "none"` skips all of this. OCSP is not implemented.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from registration_app.core.errors import RevocationUnavailable, UntrustedChain

__all__ = ["CrlChecker", "fetch_http"]

log = logging.getLogger("autoenroll.revocation")

MAX_CRL_BYTES = 10 * 1024 * 1024
MAX_CACHED_CRLS = 256
CLOCK_SKEW = timedelta(minutes=5)  # a CRL signed "in the future" by this much is still accepted
FAILURE_BACKOFF = timedelta(seconds=10)  # a distribution point that failed is not asked again sooner

Fetch = Callable[[str, float], bytes]


def fetch_http(url: str, timeout: float) -> bytes:
    """GET `url`; the body, at most MAX_CRL_BYTES. Raises OSError (urllib's errors are OSErrors)."""
    request = urllib.request.Request(url, headers={"Accept": "application/pkix-crl"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked)
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        body = response.read(MAX_CRL_BYTES + 1)
    if len(body) > MAX_CRL_BYTES:
        raise OSError(f"the CRL is larger than {MAX_CRL_BYTES} bytes")
    return body


@dataclass(frozen=True)
class _Cached:
    crl: x509.CertificateRevocationList
    fetched_at: datetime


class CrlChecker:
    """`is_revoked(cert, issuer, max_age, now)`: thread-safe, one fetch per URL at a time."""

    def __init__(self, *, timeout: float = 5.0, fetch: Fetch = fetch_http) -> None:
        self.timeout = timeout
        self._fetch = fetch
        self._cache: OrderedDict[tuple[str, bytes], _Cached] = OrderedDict()
        self._failed_until: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._url_locks: dict[str, threading.Lock] = {}

    def is_revoked(self, cert: x509.Certificate, issuer: x509.Certificate, max_age: timedelta,
                   now: datetime) -> bool:
        """Whether `cert` (issued by `issuer`) is on its issuer's CRL. Raises UntrustedChain when the
        certificate names no HTTP CRL distribution point, RevocationUnavailable when none answers."""
        now = now.astimezone(timezone.utc) if now.tzinfo else now.replace(tzinfo=timezone.utc)
        urls = distribution_points(cert)
        if not urls:
            raise UntrustedChain(
                f"the certificate (serial {cert.serial_number:x}) names no HTTP CRL distribution point, so its "
                "revocation cannot be checked; its trust anchor requires a CRL check")
        problems = []
        for url in urls:
            try:
                crl = self._crl(url, issuer, max_age, now)
            except _Unusable as problem:
                problems.append(f"{url}: {problem}")
                continue
            return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        log.warning("event=revocation.unavailable serial=%x issuer=%r problems=%r", cert.serial_number,
                    issuer.subject.rfc4514_string(), problems)
        raise RevocationUnavailable(
            f"the revocation status of the certificate (serial {cert.serial_number:x}) cannot be checked: "
            f"{'; '.join(problems)[:400]}; try again later")

    # -- the cache ----------------------------------------------------------------------------------
    def _crl(self, url: str, issuer: x509.Certificate, max_age: timedelta,
             now: datetime) -> x509.CertificateRevocationList:
        # One URL could serve the CRLs of two issuers (cross-certified CAs): the issuer is part of the key.
        key = (url, issuer.fingerprint(hashes.SHA256()))
        with self._lock:
            url_lock = self._url_locks.setdefault(url, threading.Lock())
        with url_lock:  # concurrent requests for one URL wait for one fetch
            with self._lock:
                cached = self._cache.get(key)
                failed_until = self._failed_until.get(url)
            if cached is not None and _fresh(cached, max_age, now):
                return cached.crl
            if failed_until is not None and now < failed_until:
                raise _Unusable("it failed a moment ago")
            try:
                crl = self._download(url, issuer, now)
            except _Unusable:
                with self._lock:
                    self._failed_until[url] = now + FAILURE_BACKOFF
                raise
            with self._lock:
                self._failed_until.pop(url, None)
                self._cache[key] = _Cached(crl, now)
                self._cache.move_to_end(key)
                while len(self._cache) > MAX_CACHED_CRLS:
                    self._cache.popitem(last=False)
            log.info("event=revocation.crl_fetched url=%s this_update=%s next_update=%s entries=%d", url,
                     crl.last_update_utc.isoformat(), crl.next_update_utc.isoformat() if crl.next_update_utc
                     else "-", len(crl))
            return crl

    def _download(self, url: str, issuer: x509.Certificate, now: datetime) -> x509.CertificateRevocationList:
        try:
            body = self._fetch(url, self.timeout)
        except (OSError, ValueError) as error:  # urllib.error.URLError, timeouts, refused connections
            raise _Unusable(_reason(error)) from None
        crl = _parse(body)
        problem = _crl_problem(crl, issuer, now)
        if problem:
            raise _Unusable(problem)
        return crl


class _Unusable(Exception):
    """This distribution point gave no usable CRL (the message says why)."""


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The HTTP(S) URLs of the certificate's CRL distribution points (direct CRLs only)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        if point.crl_issuer or not point.full_name:  # indirect CRLs and relative names: not supported
            continue
        for name in point.full_name:
            if isinstance(name, x509.UniformResourceIdentifier) and \
                    name.value.lower().startswith(("http://", "https://")):
                urls.append(name.value)
    return urls


def _fresh(cached: _Cached, max_age: timedelta, now: datetime) -> bool:
    next_update = cached.crl.next_update_utc
    return now - cached.fetched_at < max_age and (next_update is None or now < next_update)


def _parse(body: bytes) -> x509.CertificateRevocationList:
    try:
        if body.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(body)
        return x509.load_der_x509_crl(body)
    except ValueError:
        raise _Unusable("the answer is not a CRL") from None


def _crl_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime) -> str:
    if crl.issuer != issuer.subject:
        return "the CRL is not the certificate issuer's"
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.crl_sign:
            return "the issuer may not sign CRLs (key usage lacks cRLSign)"
    except x509.ExtensionNotFound:
        pass
    try:
        if not crl.is_signature_valid(issuer.public_key()):
            return "the CRL's signature does not verify with the issuer's key"
    except (TypeError, ValueError):
        return "the CRL's signature cannot be checked with the issuer's key"
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        return "the CRL is a delta CRL"
    except x509.ExtensionNotFound:
        pass
    if crl.last_update_utc > now + CLOCK_SKEW:
        return f"the CRL is not valid before {crl.last_update_utc.isoformat()}"
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        return f"the CRL is stale (its nextUpdate was {crl.next_update_utc.isoformat()})"
    return ""


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"[:200]
    return f"{type(error).__name__}: {error}"[:200]
