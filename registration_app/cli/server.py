"""`autoenroll serve`."""

from __future__ import annotations

import click

from .root import _settings, main


@main.command()
@click.pass_context
def serve(ctx) -> None:
    """Run the registration server under gunicorn (TLS, optional client certificates)."""
    from ..web.server import run
    run(_settings(ctx))
