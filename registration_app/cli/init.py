"""`autoenroll init` and `autoenroll client-cert`: the data folder, its PKI, secrets and database. They
parse options and print; the use cases are registration_app/ra/setup.py."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from ..ra.setup import KEY_NAMES, KeyStoreChoice, OptionConflict, choose_key_store, initialise
from ..settings import DEFAULT_CONFIG
from .root import _settings, main

_KEY_CHOICE = click.Choice(list(KEY_NAMES))


def key_store_options(command):
    """`--key-store pkcs11 --module PATH --token LABEL --pin-file FILE [--file-key NAME ...]` for init."""
    @click.option("--key-store", "key_store", type=click.Choice(["files", "pkcs11"]), default=None,
                  help="Where the CA, TLS CA and KRA keys are generated (default: [key_store] of the "
                       "configuration, else files).")
    @click.option("--module", default=None, help="The PKCS#11 module (with --key-store pkcs11).")
    @click.option("--token", default=None, help="The label of the token (with --key-store pkcs11).")
    @click.option("--pin-file", default=None, help="The file holding the token's user PIN, mode 0600.")
    @click.option("--file-key", "file_keys", multiple=True, type=_KEY_CHOICE,
                  help="With --key-store pkcs11: keep this key in a file all the same (repeatable).")
    @functools.wraps(command)
    def wrapper(*args, key_store, module, token, pin_file, file_keys, **kwargs):
        choice = KeyStoreChoice(key_store=key_store, module=module, token=token, pin_file=pin_file,
                                file_keys=tuple(file_keys))
        return command(*args, key_store_choice=choice, **kwargs)
    return wrapper


@main.command()
@click.option("--ca-key-type", type=click.Choice(["ec-p256", "rsa-3072"]), default="ec-p256", show_default=True)
@click.option("--ca-name", default="Autoenroll CA", show_default=True)
@click.option("--server-name", "server_names", multiple=True, default=("localhost", "127.0.0.1"), show_default=True)
@click.option("--agent-name", "agent_names", multiple=True, default=("agent.example.org",), show_default=True)
@click.option("--http-host", default=None,
              help="Public host name of the plain-HTTP CRL and CA certificate URLs written into every "
                   "certificate (default: this machine's fully qualified name); recorded as http_url.")
@key_store_options
@click.pass_context
def init(ctx, ca_key_type, ca_name, server_names, agent_names, http_host, key_store_choice) -> None:
    """Create the CA, the KRA storage key, TLS certificates, the server secrets, the database and the
    agent config; on an existing data folder, make it private and move secrets out of an older database.
    With --key-store pkcs11 the CA, TLS CA and KRA keys are generated in the token (README, Keys in an HSM)."""
    try:
        settings, key_store_table = choose_key_store(_settings(ctx), key_store_choice)
    except OptionConflict as exc:
        raise click.UsageError(exc.detail) from exc
    done = initialise(settings, ca_key_type=ca_key_type, ca_name=ca_name, server_names=server_names,
                      agent_names=agent_names, http_host=http_host, key_store_table=key_store_table,
                      config_path=ctx.obj["config_path"])
    if done.made_private:
        click.echo(f"  made {done.data_dir} private (mode 700)", err=True)
    click.echo(("already initialised: " if done.existed else "initialised: ") + str(done.data_dir.resolve()))
    click.echo(f"  CA certificate: {done.ca_cert}")
    click.echo(f"  agent config:   {done.agent_config}")
    for line in done.upgraded:
        click.echo(f"  {line}")
    if done.operator_config is not None:
        click.echo(f"  configuration:  {DEFAULT_CONFIG} (LDAP {settings.ldap.url}, HTTPS {settings.bind})")
    _print_http_url(done.http, settings)
    if done.key_store is not None:
        _print_key_store(done.key_store)


def _print_http_url(http, settings) -> None:
    if not http.written:
        if http.ignored_host:
            click.echo(f"warning: --http-host {http.ignored_host} ignored: http_url = {settings.http_url!r} is "
                       f"configured already (change it where it is set, e.g. {http.config})",
                       err=True)
        click.echo(f"  CRL and CA URLs: {http.crl_url}, {http.ca_issuers_url}")
        return
    click.echo(f"  CRL and CA URLs: {http.crl_url}, {http.ca_issuers_url} (http_url in {http.config})")
    if http.stand_in:
        base = http.crl_url.removesuffix("/crl/ca.crl")
        click.echo(f"WARNING: this machine's name ({http.machine_name!r}) is not a fully qualified public DNS "
                   f"name, so certificates will name {base} for their CRL and CA certificate, a stand-in that "
                   f"relying parties cannot reach. Before issuing certificates, set http_url in {http.config} "
                   "to the public name of this server's plain-HTTP port (or delete that line and run "
                   "`autoenroll init --http-host NAME` again).", err=True)


def _print_key_store(record) -> None:
    if not record.written:
        click.echo(f"warning: {record.target} has a [key_store] table already; make it say what init did:"
                   f"{record.table}", err=True)
        return
    click.echo(f"  keys in token {record.token!r}: {', '.join(record.keys)} ([key_store] in {record.target})")


@main.command("client-cert")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for NAME.pem and NAME.key (default: the data directory).")
@click.option("--days", type=click.IntRange(1, 825), default=825, show_default=True)
@click.pass_context
def client_cert(ctx, name: str, out_dir: Path | None, days: int) -> None:
    """Issue a TLS client certificate from the TLS CA: a new user server (agent), or the RA's
    certificate for a split deployment. NAME goes into the CN and the DNS SAN, the allow-list name."""
    from ..ra.setup import issue_client_certificate
    from ..wiring import key_store
    settings = _settings(ctx)
    issued = issue_client_certificate(settings, key_store(settings), name, out_dir=out_dir, days=days)
    click.echo(f"{issued.cert}\n{issued.key} (mode 0600)")
    click.echo(f"allow it with agents_allowed (agents) or authority_clients (the RA): {name}", err=True)
