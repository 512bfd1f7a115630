"""`autoenroll escrow ...`: the key authority's pending escrows; the use case is registration_app/ra/escrow.py."""

from __future__ import annotations

import click

from .root import _services, main


@main.group("escrow")
def escrow() -> None:
    """The key authority's escrowed keys (role kra or all)."""


@escrow.command("sweep")
@click.pass_context
def sweep(ctx) -> None:
    """Settle the pending escrows now by the CA's records: confirm those whose certificate is recorded, void
    those without one older than escrow_pending_grace_seconds (the KRA also does this every minute)."""
    from ..ra.escrow import sweep_escrows
    settled = sweep_escrows(_services(ctx))
    for state in ("confirmed", "void"):
        for serial in settled.get(state, []):
            click.echo(f"{state} {serial}")
    click.echo(f"{len(settled.get('confirmed', []))} confirmed, {len(settled.get('void', []))} voided")
