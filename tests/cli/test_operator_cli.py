"""The operator's commands on a real data directory (no server needed)."""

from __future__ import annotations

import subprocess

from tests.e2e.platform import cli


def test_init_is_idempotent_and_never_overwrites_keys(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('data_dir = "data"\n')
    first = cli("autoenroll", "--config", str(config), "init").stdout
    assert "initialised:" in first
    ca_before = (tmp_path / "data" / "ca.key").read_bytes()
    assert "already initialised" in cli("autoenroll", "--config", str(config), "init").stdout
    assert (tmp_path / "data" / "ca.key").read_bytes() == ca_before
    for name in ("ca.key", "kra.key", "tls-ca.key", "server.key", "agent.key", "passphrase"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name
    (tmp_path / "data" / "kra.key").unlink()  # a half-made PKI is for a person to look at
    broken = cli("autoenroll", "--config", str(config), "init", check=False)
    assert broken.returncode != 0 and "refusing to overwrite" in broken.stderr
    assert (tmp_path / "data" / "ca.key").read_bytes() == ca_before


def test_client_cert_issues_an_agent_certificate_that_openssl_accepts(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('data_dir = "data"\n')
    cli("autoenroll", "--config", str(config), "init")
    out = cli("autoenroll", "--config", str(config), "client-cert", "mail01.example.org",
              "--out", str(tmp_path / "agents")).stdout
    cert, key = tmp_path / "agents" / "mail01.example.org.pem", tmp_path / "agents" / "mail01.example.org.key"
    assert str(cert) in out and key.stat().st_mode & 0o777 == 0o600
    verify = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile",
                             tmp_path / "data" / "tls-ca.pem", cert], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    again = cli("autoenroll", "--config", str(config), "client-cert", "mail01.example.org",
                "--out", str(tmp_path / "agents"), check=False)
    assert again.returncode != 0  # never overwrites a key
