"""How both command lines (`autoenroll`, `autoenroll-agent`) report a failure: one line on stderr and a
non-zero exit code, never a Python stack, unless `--debug` (or AUTOENROLL_DEBUG=1) asks for it.

One place turns every error a command can meet into that line: the project's own errors (their public
detail), an unreachable database (the store's DatabaseUnavailable, with what the driver said), a file that cannot be read or written, and, for anything else, its
type and message with a pointer to --debug. Imports stay inside the handlers: a command that succeeds
never pays for them.
"""

from __future__ import annotations

import os

import click

DEBUG_ENV = "AUTOENROLL_DEBUG"


def debug_requested(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def describe(exc: BaseException, settings=None) -> str:
    """The one line an operator reads for `exc`; `settings` (the operator's) say where LDAP was sought."""
    from .core.errors import AutoenrollError, DatabaseUnavailable, DirectoryUnavailable
    if isinstance(exc, DatabaseUnavailable) and exc.cause:  # the store's translation of the driver's error
        return f"the database is unavailable: {exc.cause}"
    if isinstance(exc, AutoenrollError):
        # What LDAP answered (SERVER_DOWN, Referral) is the useful part; other extras repeat the detail.
        extra = ", ".join(str(value) for key, value in exc.extra.items() if key.startswith("ldap_"))
        line = f"{exc.detail} ({extra})" if extra else exc.detail
        if isinstance(exc, DirectoryUnavailable) and settings is not None:
            line += f" [LDAP {settings.ldap.url}, users base {settings.ldap.users_base}]"
            if "ldap_error" in exc.extra:  # no answer at all: perhaps the wrong address
                line += "; the configuration's [ldap] url (or AUTOENROLL_LDAP__URL) says where it is"
        return line
    module = type(exc).__module__
    if module.startswith("ldap"):
        return f"LDAP error: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror or exc}" if where else f"{exc.strerror or exc}"
    return f"unexpected {type(exc).__name__}: {exc} (run again with --debug for the stack)"


class ReportingGroup(click.Group):
    """A click group whose commands' failures become `Error: <one line>` on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug_requested(ctx):
                raise
            raise click.ClickException("interrupted") from None
        except Exception as exc:  # noqa: BLE001 - this is the one place that reports them all
            if debug_requested(ctx):
                raise
            settings = ctx.obj.get("settings") if isinstance(ctx.obj, dict) else None
            raise click.ClickException(describe(exc, settings)) from None


debug_option = click.option(
    "--debug", is_flag=True, help=f"Show the Python stack of an error (also {DEBUG_ENV}=1).")
