"""The operator's use cases of the directory and the CRL: `autoenroll sync status|drain|reconcile`,
`autoenroll provision` and `autoenroll crl`. The commands (registration_app/cli/directory.py) parse
options, call these and print what they return; every refusal is an AutoenrollError."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..core.errors import AutoenrollError
from ..settings import Settings

EVERYTHING = 100000  # what one drain publishes at most: everything that is due, in practice


def sync_status(settings: Settings) -> dict:
    """The outbox, each publication target's state of it, the last reconcile pass and the CRL."""
    from ..store.db import Database
    from .operators import directory_status
    db = Database(settings.db_url)
    try:
        return directory_status(db, targets=settings.targets)
    finally:
        db.dispose()


@dataclass(frozen=True)
class Drained:
    published: int  # outbox rows the directory took
    targets: tuple[tuple[str, int], ...] = ()  # (target name, rows it took), in the order of [targets]


def drain(services) -> Drained:
    """Publish everything that is due now, to the directory and to every extra publication target."""
    published = services.publisher.drain(limit=EVERYTHING)
    targets = tuple((target.name, target.drain(limit=EVERYTHING)) for target in services.publisher.targets)
    return Drained(published, targets)


def reconciler(services, *, operator: str):
    """The directory_sync Reconciler of this process's directory, CA, publisher and profiles."""
    from directory_sync.reconcile import Reconciler
    return Reconciler(services.db, services.directory, services.ca, services.publisher,
                      services.settings.profiles, actor=f"reconcile:{operator}")


def reconcile(services, *, dry_run: bool, incremental: bool, operator: str):
    """One pass: revoke and unpublish what is no longer entitled, put the directory in line with the CA
    (nothing changed with `dry_run`); the report says what was (or would be) done and what failed."""
    return reconciler(services, operator=operator).run(dry_run=dry_run, incremental=incremental)


def reconcile_periodically(services, every: float, *, incremental: bool, operator: str,
                           echo: Callable[[str], None]) -> None:
    """A full pass, then one every `every` seconds (incremental ones if asked), each pass's summary
    given to `echo`, until interrupted."""
    from directory_sync.reconcile import run_periodically
    run_periodically(reconciler(services, operator=operator), every, incremental=incremental, echo=echo)


@dataclass(frozen=True)
class CurrentCrl:
    crl: x509.CertificateRevocationList
    number: int
    not_published: str | None  # why the directory did not take it now (the outbox retries); None: it did


def current_crl(services, *, refresh: bool, out: Path | None = None) -> CurrentCrl:
    """The CRL in effect (rebuilt if past half its validity; a new one, with a new number, if `refresh`),
    published to the directory now, and written (DER) to `out` if given."""
    crl = services.ca.refresh_crl() if refresh else services.ca.crl()
    not_published = None
    try:
        services.publisher.drain(limit=EVERYTHING)
    except AutoenrollError as exc:
        not_published = exc.detail
    if out is not None:
        out.write_bytes(crl.public_bytes(Encoding.DER))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return CurrentCrl(crl, number, not_published)


def provision_group(services, group: str, profile_name: str | None, *, batch_size: int, dry_run: bool,
                    operator: str, progress: Callable[[int, int], None] | None = None):
    """An escrowed encryption certificate for every entitled member of `group` who lacks one (of the
    profile, default_encryption_profile if None); with `dry_run` only the counts. The key pool is
    stopped when it ends."""
    from ..core.profiles import get_profile
    from .provision import Provisioner
    try:
        profile = get_profile(services.settings.profiles, profile_name or services.settings.default_encryption_profile)
        provisioner = Provisioner(services, batch_size=batch_size, actor=f"provision:{operator}")
        return provisioner.run(group, profile, dry_run=dry_run, progress=progress)
    finally:
        if services.pool is not None:  # role kra has none (and Provisioner has refused it)
            services.pool.stop()
