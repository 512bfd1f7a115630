"""The one LDAP client of the project: python-ldap (libldap) connections, a small pool of them, and the
one translator from python-ldap's exceptions to registration_app.core.errors.

Nothing outside directory_sync sees a python-ldap exception: every caller of this module either runs its
work through `ConnectionPool.run` / `ConnectionPool.paged` (which translate), or, holding a connection
of its own (bulk.py), passes what it catches to `translate`.

Thread safety: `ConnectionPool.run` lends each bound connection to one thread at a time, so gunicorn
gthread workers can share one pool. A pooled connection that the server dropped (slapd restarted) is
closed and the work tried once more on a fresh one; if that fails too the caller gets
DirectoryUnavailable within `timeout_seconds`.

Entries come back as (dn, {lower-case attribute name: [bytes, ...]}); read a value with `values`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import TypeVar

import ldap
from ldap.controls import SimplePagedResultsControl
from ldap.ldapobject import LDAPObject

from directory_sync import transport
from directory_sync.config import LdapSettings
from directory_sync.transport import Credentials
from registration_app.core.errors import AutoenrollError, DirectoryTlsFailed, DirectoryUnavailable, UserNotFound

T = TypeVar("T")
Attributes = dict[str, list[bytes]]
Entry = tuple[str, Attributes]

PAGE_SIZE = 500
NO_SUCH_OBJECT = 32
# Result codes that say "the server cannot serve right now", as opposed to "it refuses this":
# operationsError, timeLimitExceeded, adminLimitExceeded, busy, unavailable, other.
_TRANSIENT = {1, 3, 11, 51, 52, 80}


def bind(settings: LdapSettings, credentials: Credentials | None = None) -> LDAPObject:
    """A new connection bound as the service account (TLS as configured, verified); python-ldap's errors
    are the caller's to translate, except a failed TLS set-up: DirectoryTlsFailed names its cause.
    `credentials` as checked at start (transport.check_settings, which runs when they are not given)."""
    credentials = credentials or transport.check_settings(settings)
    servers = transport.servers(settings.url)
    conn = ldap.initialize(" ".join(s.url for s in servers))
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.timeout_seconds)
    conn.timeout = settings.timeout_seconds  # every synchronous (_s) operation waits at most this long
    tls = transport.uses_tls(settings)
    if tls:
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)  # also checks the host name
        conn.set_option(ldap.OPT_X_TLS_CACERTFILE, transport.ca_file(settings))
        if settings.client_cert_file:
            conn.set_option(ldap.OPT_X_TLS_CERTFILE, settings.client_cert_file)
            conn.set_option(ldap.OPT_X_TLS_KEYFILE, settings.client_key_file)
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # last: the TLS context is built from the options above
    try:
        if settings.start_tls:
            try:
                conn.start_tls_s()
            except ldap.LDAPError as exc:
                if answered(exc):
                    raise DirectoryTlsFailed(f"The LDAP server refused StartTLS ({_info(exc)})",
                                             cause="starttls_refused") from exc
                raise
        if credentials.mechanism == "EXTERNAL":
            conn.sasl_non_interactive_bind_s("EXTERNAL")
        else:
            conn.simple_bind_s(credentials.bind_dn, credentials.password)
    except (ldap.SERVER_DOWN, ldap.CONNECT_ERROR) as exc:
        close(conn)
        failure = transport.tls_failure(settings, settings.timeout_seconds) if tls else None
        if failure is not None:
            raise failure from exc
        raise
    except BaseException:
        close(conn)
        raise
    return conn


def _info(exc: ldap.LDAPError) -> str:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return str(info.get("info") or info.get("desc") or type(exc).__name__)


def check_directory(settings: LdapSettings) -> None:
    """At start-up, before serving: the settings (ConfigError), then one bind, so that a TLS set-up an
    operator must fix (DirectoryTlsFailed: certificate not verified, name mismatch, StartTLS refused)
    stops the server with its cause. A directory that is merely down is no reason not to start."""
    credentials = transport.check_settings(settings)
    try:
        close(bind(settings, credentials))
    except DirectoryTlsFailed:
        raise
    except ldap.LDAPError:
        pass  # unreachable now: requests answer 503 and the outbox retries until it answers


def close(conn: LDAPObject) -> None:
    """Unbind and close the socket, whatever state the connection is in."""
    try:
        conn.unbind_ext_s()
    except Exception:  # the peer may be gone; we only want the socket closed
        pass


def result_code(exc: ldap.LDAPError) -> int | None:
    """The LDAP result code the server sent, or None for a client-side failure (no answer came)."""
    code = getattr(exc, "errnum", None)
    return code if isinstance(code, int) and code >= 0 else None


def answered(exc: ldap.LDAPError) -> bool:
    """True if the server answered (with a refusal): the connection is still good for more work."""
    return result_code(exc) is not None and not isinstance(exc, ldap.TIMEOUT)


def translate(exc: ldap.LDAPError) -> AutoenrollError:
    """The project's error for a python-ldap exception (the one adapter; see the module docstring).
    Every answer that is not the caller's fault is a 503 DirectoryUnavailable whose message says what
    the directory did, so that an operator can tell a refused bind from a size limit or a referral."""
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    description = info.get("desc", type(exc).__name__)
    if isinstance(exc, ldap.INVALID_CREDENTIALS):
        return DirectoryUnavailable("The LDAP directory refused the service account's bind")
    if isinstance(exc, (ldap.CONFIDENTIALITY_REQUIRED, ldap.STRONG_AUTH_REQUIRED)):
        return DirectoryUnavailable("The LDAP directory requires a protected connection for the service "
                                    "account's bind: use ldaps:// or start_tls = true", ldap_result=description)
    if isinstance(exc, (ldap.INAPPROPRIATE_AUTH, ldap.AUTH_METHOD_NOT_SUPPORTED)):
        return DirectoryUnavailable("The LDAP directory refused the service account's way of binding",
                                    ldap_result=description)
    if isinstance(exc, ldap.TIMEOUT):
        return DirectoryUnavailable("The LDAP directory did not answer within timeout_seconds",
                                    ldap_error="TIMEOUT")
    code = result_code(exc)
    if code is None:
        if isinstance(exc, (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)):
            return DirectoryUnavailable(ldap_error=type(exc).__name__)
        return AutoenrollError("LDAP client error", ldap_error=type(exc).__name__)  # a bug of ours
    if code == NO_SUCH_OBJECT:
        return UserNotFound("The directory entry does not exist")
    if isinstance(exc, ldap.SIZELIMIT_EXCEEDED):
        return DirectoryUnavailable("The LDAP directory's size limit cut the search short: give the service "
                                    "account an unlimited size limit (paged searches ask for pages of "
                                    f"{PAGE_SIZE})", ldap_result=description)
    if isinstance(exc, ldap.REFERRAL):
        where = str(info.get("info", "")).replace("Referral:", "").strip()
        return DirectoryUnavailable(f"The LDAP directory answered with a referral{f' to {where}' if where else ''}; "
                                    "referrals are not followed: point url at the server that holds the entries",
                                    ldap_result=description)
    if code in _TRANSIENT:
        return DirectoryUnavailable(ldap_result=description)
    # insufficientAccessRights, objectClassViolation...: a deployment problem, not the caller's; 503 so
    # that the outbox keeps retrying until an operator fixes it.
    return DirectoryUnavailable("The LDAP directory refused the operation", ldap_result=description)


def values(attrs: Attributes, name: str) -> list[bytes]:
    """The values of `name` in an entry as returned here (any case; `userCertificate;binary` too)."""
    return attrs.get(name.lower(), [])


def lowered(attrs: dict[str, list[bytes]]) -> Attributes:
    return {k.lower(): list(v) for k, v in attrs.items()}


def read(conn: LDAPObject, dn: str, attributes: list[str], timeout: float) -> Attributes | None:
    """One entry's attributes, or None if there is no such entry."""
    try:
        found = conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", attributes, timeout=timeout)
    except ldap.NO_SUCH_OBJECT:
        return None
    return lowered(found[0][1]) if found and found[0][0] is not None else None


def search_pages(conn: LDAPObject, base: str, flt: str, attributes: list[str], *, timeout: float,
                 page_size: int = PAGE_SIZE) -> Iterator[list[Entry]]:
    """Paged subtree search (RFC 2696) on `conn`, one list of entries per page; nothing if `base` is
    missing. Referrals (entries without a DN) are skipped. python-ldap's exceptions pass through.

    The next page is asked for before this one is handed out, so that the server prepares it while
    the caller works through this one (on a million entries the two took turns otherwise)."""
    control = SimplePagedResultsControl(True, size=page_size, cookie=b"")
    pending: int | None = conn.search_ext(base, ldap.SCOPE_SUBTREE, flt, attributes, serverctrls=[control])
    try:
        while pending is not None:
            try:
                _, data, _, controls = conn.result3(pending, timeout=timeout)
            except ldap.NO_SUCH_OBJECT:
                pending = None
                return
            pending = None
            cookie = next((c.cookie for c in controls if c.controlType == SimplePagedResultsControl.controlType), b"")
            if cookie:
                control.cookie = cookie
                pending = conn.search_ext(base, ldap.SCOPE_SUBTREE, flt, attributes, serverctrls=[control])
            yield [(dn, lowered(attrs)) for dn, attrs in data if dn is not None]
    finally:
        if pending is not None:  # the caller stopped early: the server need not finish the page
            try:
                conn.abandon_ext(pending)
            except ldap.LDAPError:
                pass


class ConnectionPool:
    """Up to `settings.pool_size` idle bound connections, lent to one thread at a time. A thread that
    finds none idle binds a new one; one returned beyond pool_size is closed, so pool_size must be at
    least the threads that use the directory at once, or requests bind anew (`opened` counts binds)."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self.credentials = transport.check_settings(settings)  # at start: ConfigError names what is wrong
        self._idle: queue.LifoQueue[LDAPObject] = queue.LifoQueue()
        self.opened = 0  # connections bound so far

    def run(self, work: Callable[[LDAPObject], T]) -> T:
        """`work(conn)` on a pooled connection; python-ldap's errors come out translated. A stale pooled
        connection (the server went away since) gets one retry on a fresh one."""
        while True:
            conn, reused = self._acquire()
            try:
                result = work(conn)
            except ldap.LDAPError as exc:
                if answered(exc):
                    self._release(conn)  # the server answered with an error: the connection is fine
                else:
                    close(conn)  # the connection itself failed (or may hold an unread answer)
                    if reused and isinstance(exc, ldap.SERVER_DOWN):
                        continue  # e.g. slapd restarted since this connection was opened
                raise translate(exc) from exc
            except AutoenrollError:
                self._release(conn)  # an LDAP answer `work` turned into an error: the connection is fine
                raise
            except BaseException:
                close(conn)
                raise
            self._release(conn)
            return result

    def read(self, dn: str, attributes: list[str]) -> Attributes | None:
        """One entry's attributes, or None if there is no such entry."""
        return self.run(lambda conn: read(conn, dn, attributes, self.settings.timeout_seconds))

    def paged(self, base: str, flt: str, attributes: list[str]) -> Iterator[Entry]:
        """Every entry under `base` matching `flt` (a filter built with escape.filter_value for any
        input), by paged search. The paging state lives on the connection, so one connection is held
        until the generator finishes; only the first page is retried on a fresh connection."""
        conn, reused = self._acquire()
        started, ok = False, False
        try:
            while True:
                try:
                    for page in search_pages(conn, base, flt, attributes, timeout=self.settings.timeout_seconds):
                        started = True
                        yield from page
                    break
                except ldap.SERVER_DOWN:
                    if started or not reused:
                        raise
                    close(conn)  # stale after a slapd restart: start over on another connection
                    conn, reused = self._acquire()
            ok = True
        except ldap.LDAPError as exc:
            raise translate(exc) from exc
        finally:
            if ok:
                self._release(conn)
            else:
                close(conn)

    @property
    def idle_connections(self) -> int:
        return self._idle.qsize()

    def close(self) -> None:
        """Close every idle connection (connections lent out are closed when they come back)."""
        while True:
            try:
                close(self._idle.get_nowait())
            except queue.Empty:
                return

    def _acquire(self) -> tuple[LDAPObject, bool]:
        """(connection, reused): an idle pooled connection, else a new bound one."""
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        try:
            conn = bind(self.settings, self.credentials)
        except ldap.LDAPError as exc:
            raise translate(exc) from exc
        self.opened += 1
        return conn, False

    def _release(self, conn: LDAPObject) -> None:
        if self._idle.qsize() < self.settings.pool_size:
            self._idle.put(conn)
        else:
            close(conn)
