"""What the commands that only parse options and print say: options that do not go together (usage,
exit 2, nothing done), init's note on a folder open to others, client-cert's files, an audit checkpoint
that cannot be read (exit 2). Through click's CliRunner on a real data folder."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from registration_app.cli import main


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "autoenroll.toml"
    path.write_text('data_dir = "data"\nhttp_url = "http://pki.example.com:8080"\n[ldap]\nurl = "ldap://127.0.0.1:1"\n')
    return path


def run(config, *args):
    return CliRunner().invoke(main, ["--config", str(config), *args])


@pytest.mark.parametrize("args, said", [
    (["init", "--module", "/lib/p11.so"], "--module, --token, --pin-file and --file-key go with --key-store pkcs11"),
    (["init", "--key-store", "pkcs11", "--token", "t"], "--key-store pkcs11 needs --module and --token"),
    (["keys", "import-to-token", "ca"], "name the token: --module and --token"),
    (["sync", "reconcile", "--every", "5", "--dry-run"], "--every and --dry-run do not go together"),
    (["sync", "reconcile", "--every", "0"], "--every needs a positive number of seconds"),
])
def test_options_that_do_not_go_together_are_a_usage_error_and_nothing_is_done(config, args, said):
    result = run(config, *args)
    assert result.exit_code == 2 and said in result.stderr and "Usage:" in result.stderr
    assert not (config.parent / "data").exists()


def test_init_says_it_made_the_folder_private_then_client_cert_prints_its_files(config, tmp_path):
    (tmp_path / "data").mkdir()
    os.chmod(tmp_path / "data", 0o755)
    first = run(config, "init")
    assert first.exit_code == 0, first.output
    assert f"  made {tmp_path / 'data'} private (mode 700)" in first.stderr
    assert first.stdout.startswith(f"initialised: {(tmp_path / 'data').resolve()}\n")
    assert "  CRL and CA URLs: http://pki.example.com:8080/crl/ca.crl, http://pki.example.com:8080/ca.crt\n" in first.stdout
    again = run(config, "init")
    assert again.exit_code == 0 and again.stdout.startswith("already initialised: ") and "made" not in again.stderr

    issued = run(config, "client-cert", "mx1.example.org", "--out", str(tmp_path / "out"))
    assert issued.exit_code == 0, issued.output
    assert issued.stdout == f"{tmp_path / 'out' / 'mx1.example.org.pem'}\n{tmp_path / 'out' / 'mx1.example.org.key'} (mode 0600)\n"
    assert "authority_clients (the RA): mx1.example.org" in issued.stderr

    intact = run(config, "audit", "verify")
    assert intact.exit_code == 0 and intact.stdout.startswith("audit log intact: ")
    checkpoint = tmp_path / "data" / "audit.checkpoint"
    checkpoint.write_bytes(b"not a checkpoint\n")
    os.chmod(checkpoint, 0o600)
    unreadable = run(config, "audit", "verify")
    assert unreadable.exit_code == 2
    assert unreadable.stderr == f"audit log NOT VERIFIED: {checkpoint}: the audit checkpoint cannot be read\n"
