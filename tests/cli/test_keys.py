"""`autoenroll keys import-to-token`: a file key moved into a SoftHSM2 token, once."""

from __future__ import annotations

from registration_app.wiring import key_store
from registration_app.settings import load_settings
from bench.platform import cli
from tests.softhsm import MODULE, access_of, private_key_blocks


def test_import_to_token_moves_the_key_once_and_serve_refuses_while_the_file_copy_exists(tmp_path, softhsm):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = data / "autoenroll.toml"
    config.write_text('data_dir = "."\nhttp_url = "http://127.0.0.1:1"\n')
    cli("autoenroll", "--config", str(config), "init")
    softhsm.new_token("import", data / "token.pin")
    command = ("autoenroll", "--config", str(config), "keys", "import-to-token", "ca", "--module", MODULE,
               "--token", "import", "--pin-file", "token.pin")

    first = cli(*command)
    assert "imported ca.key into token 'import' as 'autoenroll-ca'" in first.stdout
    assert f"NOW DESTROY THE FILE COPY: {data / 'ca.key'}" in first.stderr
    keys = private_key_blocks(softhsm.list_objects("import", data / "token.pin"))
    assert "sensitive" in access_of(keys["autoenroll-ca"]) and "extractable" not in access_of(keys["autoenroll-ca"])

    again = cli(*command, check=False)
    assert again.returncode == 1 and "refusing to import it twice" in again.stderr
    assert f"shred -u {data / 'ca.key'}" in again.stderr

    config.write_text(config.read_text() + f'[key_store]\nin_token = ["ca"]\nmodule = "{MODULE}"\n'
                                           'token = "import"\npin_file = "token.pin"\n')
    refused = cli("autoenroll", "--config", str(config), "serve", check=False, timeout=60)
    assert refused.returncode != 0 and "ca.key still in" in refused.stderr and "destroy the file copy" in refused.stderr

    (data / "ca.key").unlink()
    key = key_store(load_settings(config)).ca_signing_key()
    key.check()  # type: ignore[union-attr]  # the token signs with the imported key: the CA certificate's
    from sqlalchemy import select

    from registration_app.store.models import AuditEvent
    from bench.platform import transaction
    with transaction(load_settings(config).db_url) as session:
        imported = session.execute(select(AuditEvent.detail).where(AuditEvent.event == "key.imported_to_token")).scalars().all()
    assert [row["token"] for row in imported] == ["import"]  # one row: the refused second run added none
    assert "audit log intact" in cli("autoenroll", "--config", str(config), "audit", "verify").stdout


def test_init_reads_the_key_store_from_the_toml_and_keeps_the_other_keys_in_files(tmp_path, softhsm):
    """The issue's example of a per-key choice: the KRA key in the token, the CA and TLS CA in files."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    softhsm.new_token("toml-kra", data / "token.pin")
    config = data / "autoenroll.toml"
    config.write_text(f'data_dir = "."\nhttp_url = "http://127.0.0.1:1"\n[key_store]\nin_token = ["kra"]\n'
                      f'module = "{MODULE}"\ntoken = "toml-kra"\npin_file = "token.pin"\n')
    cli("autoenroll", "--config", str(config), "init")
    assert (data / "ca.key").exists() and (data / "tls-ca.key").exists() and not (data / "kra.key").exists()
    keys = private_key_blocks(softhsm.list_objects("toml-kra", data / "token.pin"))
    assert list(keys) == ["autoenroll-kra"] and "never extractable" in access_of(keys["autoenroll-kra"])
    again = cli("autoenroll", "--config", str(config), "init")  # a second init changes nothing
    assert "already initialised" in again.stdout
    assert list(private_key_blocks(softhsm.list_objects("toml-kra", data / "token.pin"))) == ["autoenroll-kra"]
