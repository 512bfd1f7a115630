"""The root of `autoenroll`: the `main` group and the helpers every command module uses. Command
modules import this one; this one imports none of them (registration_app/cli/__init__.py does)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from ..cli_errors import ReportingGroup, debug_option
from ..settings import DEFAULT_CONFIG, Settings, load_settings


def _settings(ctx) -> Settings:
    return ctx.obj["settings"]


@click.group(cls=ReportingGroup)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="AUTOENROLL_CONFIG",
              help=f"TOML configuration (default: {DEFAULT_CONFIG} if `autoenroll init` wrote it, else the "
                   "built-in defaults with data in ./var).")
@debug_option
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """Registration server: second certificates from first ones, beside LDAP."""
    # The server logs each request; a command's INFO lines would only repeat what it prints.
    default_level = "INFO" if ctx.invoked_subcommand == "serve" else "WARNING"
    logging.basicConfig(level=os.environ.get("AUTOENROLL_LOG_LEVEL", default_level),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to an operator
    # Without --config, load_settings reads what `init` wrote (<data_dir>/autoenroll.toml) if it is there;
    # a --config that names no file is an error, not the defaults.
    settings = load_settings(config_path)
    ctx.obj = {"settings": settings, "config_path": config_path}


def _services(ctx):
    from ..wiring import build_services
    services = build_services(_settings(ctx))
    ctx.call_on_close(services.close)  # LDAP connections and the database closed when the command ends
    return services



def _operator() -> str:
    return f"operator:{os.environ.get('SUDO_USER') or os.environ.get('USER') or 'unknown'}"
