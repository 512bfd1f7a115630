"""The operator's commands on a real data directory (no server needed)."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime

from sqlalchemy import text

from bench.platform import cli, transaction


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
        assert "checks" in rogue.request("GET", "/health").json()  # an agent's health has the details
        audit_before = records.counts(platform)["audit"]
        out = platform.autoenroll("revoke-agent", str(cert), "--reason", "keyCompromise").stdout
        assert out.startswith("revoked: CN=rogue.example.org")
        rogue.resend_on_reset = False
        refused = rogue.request("GET", "/api/v1/nonce")
        assert refused.status == 403 and refused.content_type.startswith("application/problem+json")
        assert refused.json()["code"] == "agent_revoked"
        assert honest.request("GET", "/api/v1/nonce").status == 200
        assert "checks" not in rogue.request("GET", "/health").json()  # revoked: the summary alone
        assert "checks" in honest.request("GET", "/health").json()
        events = [(e.event, e.subject) for e in records.audit_since(platform, audit_before)]
        assert ("agent.revoked", "CN=rogue.example.org") in events
        assert platform.autoenroll("revoke-agent", str(cert)).stdout.startswith("already revoked")
    finally:
        rogue.close()
        honest.close()


def data_folder(tmp_path):
    """A config whose data folder already exists as a person's `mkdir` leaves it (mode 755), on the
    suite's database (PostgreSQL with --database=postgresql)."""
    from bench.postgres import database_url_for
    url = database_url_for()
    config = tmp_path / "a.toml"
    config.write_text('data_dir = "data"\n' + (f'database_url = "{url}"\n' if url else ""))
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data").chmod(0o755)
    return config, tmp_path / "data"


def test_init_makes_the_data_folder_private_and_writes_the_server_secrets_beside_the_database(tmp_path):
    from registration_app.settings import load_settings
    from registration_app.store.db import sqlite_files
    config, data = data_folder(tmp_path)
    cli("autoenroll", "--config", str(config), "init")
    assert data.stat().st_mode & 0o777 == 0o700
    for name in ("nonce.secret", "codes.secret", "audit.secret"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
        assert len(bytes.fromhex((data / name).read_text())) == 32
    for path in sqlite_files(load_settings(config).db_url):
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600, path
    assert "already initialised" in cli("autoenroll", "--config", str(config), "init").stdout
    with transaction(load_settings(config).db_url) as session:
        assert session.execute(text("SELECT count(*) FROM sync_state")).scalar_one() == 0


def test_commands_refuse_a_data_folder_or_secret_that_others_can_read(tmp_path):
    config, data = data_folder(tmp_path)
    cli("autoenroll", "--config", str(config), "init")
    for path, mode, wanted in ((data, 0o755, "chmod 700"), (data / "audit.secret", 0o644, "chmod 600")):
        path.chmod(mode)
        for command in (("invite", "a@example.org"), ("serve",)):
            refused = cli("autoenroll", "--config", str(config), *command, check=False, timeout=60)
            assert refused.returncode != 0 and wanted in refused.stderr and "open to other users" in refused.stderr
            assert "Traceback" not in refused.stderr, refused.stderr
        path.chmod(mode & 0o700)
    cli("autoenroll", "--config", str(config), "init")  # and init puts them right


def test_audit_verify_reports_the_whole_log_deleted_and_a_dropped_table(tmp_path):
    from registration_app.settings import load_settings
    config, data = data_folder(tmp_path)
    cli("autoenroll", "--config", str(config), "init")
    cli("autoenroll", "--config", str(config), "revoke-agent", str(data / "agent.pem"))  # one audit row
    intact = cli("autoenroll", "--config", str(config), "audit", "verify")
    assert "audit log intact: 1 rows, keyed" in intact.stdout and "checkpoint" in intact.stdout
    url = load_settings(config).db_url
    with transaction(url) as session:  # what someone with the database's password can do
        session.execute(text("DELETE FROM audit"))
        session.execute(text("DELETE FROM audit_head"))
    deleted = cli("autoenroll", "--config", str(config), "audit", "verify", check=False)
    assert deleted.returncode == 2 and "rows were deleted" in deleted.stderr, deleted.stderr
    with transaction(url) as session:
        session.execute(text("DROP TABLE audit"))
    dropped = cli("autoenroll", "--config", str(config), "audit", "verify", check=False)
    assert dropped.returncode == 2 and dropped.stderr.strip().splitlines() == [
        "audit log BROKEN after 0 good rows: the table audit is missing from the database (dropped?)"]


def test_the_checkpoint_keeps_up_with_two_workers_appending_at_once(platform):
    """Refused requests from 8 agents at once, on both gunicorn workers: each writes a request.denied
    row and moves the checkpoint after its commit. Once all are answered the checkpoint is the head of
    the log, and `audit verify` finds the log intact against it (no false alarm from the race)."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.client import AgentConnection
    from registration_app.settings import load_settings
    from registration_app.store.anchor import AuditAnchor
    from registration_app.store.models import AuditHead

    def refused_requests(_: int) -> list[int]:
        conn = AgentConnection(platform.url, ca=platform.data / "tls-ca.pem", cert=platform.data / "agent.pem",
                               key=platform.data / "agent.key")
        try:
            return [conn.post("enroll", b"{not a jws").status for _ in range(15)]
        finally:
            conn.close()

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for batch in pool.map(refused_requests, range(8)) for s in batch]
    assert set(statuses) == {400} and len(statuses) == 120
    settings = load_settings(platform.config)
    key = bytes.fromhex(settings.path("audit.secret").read_text())
    checkpoint = AuditAnchor(settings.path("audit.checkpoint"), key).read()
    with transaction(settings.db_url) as session:
        head = session.get(AuditHead, 1)
        assert (checkpoint.rows, checkpoint.last_id, checkpoint.last_hash) == (head.rows, head.last_id, head.last_hash)
    intact = platform.autoenroll("audit", "verify").stdout
    assert f"audit log intact: {head.rows} rows, keyed; its first {head.rows} match the checkpoint" in intact


def test_a_data_folder_from_before_the_server_secrets_is_refused_until_init_moves_them_out(tmp_path):
    """As a data folder of schema 0004 was: no secret files, the nonce key in sync_state, a plain SHA-256
    audit chain. Every command refuses with what to do; `autoenroll init` moves them out, and the
    upgraded log verifies."""
    from alembic import command
    from alembic.config import Config

    from registration_app.settings import load_settings
    from registration_app.store import audit
    from registration_app.store.db import MIGRATIONS
    config, data = data_folder(tmp_path)
    cli("autoenroll", "--config", str(config), "init")
    cli("autoenroll", "--config", str(config), "revoke-agent", str(data / "agent.pem"))
    url = load_settings(config).db_url
    alembic = Config()
    alembic.set_main_option("script_location", str(MIGRATIONS))
    alembic.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.downgrade(alembic, "0004")
    with transaction(url) as session:  # the chain as revision 0004 computed it, and its nonce key row
        prev = audit.GENESIS
        for row in session.execute(text("SELECT id, at, event, outcome, actor, subject, detail FROM audit "
                                        "ORDER BY id")).all():
            detail = json.loads(row.detail) if isinstance(row.detail, str) else row.detail  # SQLite: text
            at = datetime.fromisoformat(row.at) if isinstance(row.at, str) else row.at
            digest = audit.unkeyed_digest(prev, at, row.event, row.outcome, row.actor, row.subject, detail)
            session.execute(text("UPDATE audit SET prev_hash = :p, hash = :h WHERE id = :id"),
                            {"p": prev, "h": digest, "id": row.id})
            prev = digest
        session.execute(text("UPDATE audit_head SET last_hash = :h"), {"h": prev})
        session.execute(text("INSERT INTO sync_state (name, value) VALUES ('nonce-mac-key', :v)"), {"v": "cd" * 32})
    for name in ("nonce.secret", "codes.secret", "audit.secret", "audit.checkpoint"):
        (data / name).unlink()
    missing = cli("autoenroll", "--config", str(config), "audit", "verify", check=False)
    assert missing.returncode != 0 and "no audit.secret" in missing.stderr and "autoenroll init" in missing.stderr
    upgraded = cli("autoenroll", "--config", str(config), "init").stdout
    assert "re-chained 1 audit row(s)" in upgraded and "removed the nonce key from the database" in upgraded
    intact = cli("autoenroll", "--config", str(config), "audit", "verify").stdout
    assert "audit log intact: 2 rows, keyed; its first 2 match the checkpoint" in intact  # + audit.rekeyed
    with transaction(url) as session:
        assert session.execute(text("SELECT count(*) FROM sync_state")).scalar_one() == 0
