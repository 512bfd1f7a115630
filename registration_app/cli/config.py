"""`autoenroll config`: the configuration in effect."""

from __future__ import annotations

import json

import click

from .root import _settings, main


@main.group()
def config() -> None:
    """The configuration in effect."""


@config.command("show")
@click.pass_context
def config_show(ctx) -> None:
    """Print the effective configuration (defaults < file < environment) as JSON, secrets masked;
    profiles as merged over the built-in ones, groups resolved to DNs."""
    from ..settings import effective_configuration
    click.echo(json.dumps(effective_configuration(_settings(ctx)), indent=2, sort_keys=True))

