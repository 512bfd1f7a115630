"""`autoenroll init` chooses the host name of the CRL and caIssuers URLs written into every certificate
(a public DNS name, as the S/MIME BR lint demands), records it as http_url where the server reads it,
and says loudly when it had to use a stand-in."""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib

import pytest

from registration_app.settings import FALLBACK_HTTP_HOST, load_settings, public_host_name
from bench.platform import BIN, cli


@pytest.mark.parametrize("name, public", [
    ("mail.example.com", True), ("ca.corp.example.org.", True), ("localhost", False), ("vm", False),
    ("vm.localdomain", False), ("host.local", False), ("ca.internal", False), ("127.0.0.1", False),
    ("::1", False), ("a..b", False), ("x.home.arpa", False)])
def test_which_names_are_public(name, public):
    assert public_host_name(name) is public


def test_init_without_a_config_records_the_machine_name_or_a_loud_stand_in(tmp_path):
    result = subprocess.run([str(BIN / "autoenroll"), "init"], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("AUTOENROLL_")}, timeout=120)
    assert result.returncode == 0, result.stderr
    generated = tmp_path / "var" / "autoenroll.toml"
    fqdn = socket.getfqdn()
    host = fqdn if public_host_name(fqdn) else FALLBACK_HTTP_HOST
    assert tomllib.loads(generated.read_text())["http_url"] == f"http://{host}:8080"
    assert (f"WARNING: this machine's name ({fqdn!r})" in result.stderr) is (host == FALLBACK_HTTP_HOST)
    assert "set http_url in var/autoenroll.toml" in result.stderr or host != FALLBACK_HTTP_HOST  # where to change it
    # Every later command reads it (the file init wrote, in the data folder).
    settings = load_settings(environ={"AUTOENROLL_DATA_DIR": str(tmp_path / "var")})
    assert settings.crl_url == f"http://{host}:8080/crl/ca.crl"
    assert settings.ca_issuers_url == f"http://{host}:8080/ca.crt"


def test_init_writes_the_given_host_into_the_given_config_and_keeps_a_configured_one(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('data_dir = "data"\nhttp_bind = "0.0.0.0:8081"\n[ldap]\nurl = "ldap://127.0.0.1:1"\n')
    out = cli("autoenroll", "--config", str(config), "init", "--http-host", "pki.example.com")
    assert "WARNING" not in out.stderr
    written = tomllib.loads(config.read_text())
    assert written["http_url"] == "http://pki.example.com:8081" and written["ldap"]["url"] == "ldap://127.0.0.1:1"
    assert load_settings(config).crl_url == "http://pki.example.com:8081/crl/ca.crl"

    before = config.read_text()
    again = cli("autoenroll", "--config", str(config), "init", "--http-host", "other.example.com")
    assert "--http-host other.example.com ignored" in again.stderr and config.read_text() == before
