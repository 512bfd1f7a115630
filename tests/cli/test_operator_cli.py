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


def test_a_revoked_agent_certificate_is_refused_at_once_even_on_its_open_connection(platform, tmp_path):
    """`autoenroll revoke-agent` on a running server: the revoked user server's next request, on the
    connection it kept alive, is a 403 agent_revoked problem (audited); the other agents work on."""
    from bench.client import AgentConnection
    from tests.fault import records

    platform.autoenroll("client-cert", "rogue.example.org", "--out", str(tmp_path))
    cert, key = tmp_path / "rogue.example.org.pem", tmp_path / "rogue.example.org.key"
    rogue = AgentConnection(platform.url, ca=platform.data / "tls-ca.pem", cert=cert, key=key)
    honest = AgentConnection(platform.url, ca=platform.data / "tls-ca.pem", cert=platform.data / "agent.pem",
                             key=platform.data / "agent.key")
    try:
        assert rogue.request("GET", "/api/v1/nonce").status == 200
        audit_before = records.counts(platform)["audit"]
        out = platform.autoenroll("revoke-agent", str(cert), "--reason", "keyCompromise").stdout
        assert out.startswith("revoked: CN=rogue.example.org")
        rogue.resend_on_reset = False
        refused = rogue.request("GET", "/api/v1/nonce")
        assert refused.status == 403 and refused.content_type.startswith("application/problem+json")
        assert refused.json()["code"] == "agent_revoked"
        assert honest.request("GET", "/api/v1/nonce").status == 200
        events = [(e.event, e.subject) for e in records.audit_since(platform, audit_before)]
        assert ("agent.revoked", "CN=rogue.example.org") in events
        assert platform.autoenroll("revoke-agent", str(cert)).stdout.startswith("already revoked")
    finally:
        rogue.close()
        honest.close()
