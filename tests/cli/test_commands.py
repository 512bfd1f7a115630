"""What operator commands say and remember: the LDAP URL and ports the first `init` was given, a dry run
that issues nothing, one server's gunicorn without the per-user control socket."""

from __future__ import annotations

import os
import subprocess

from directory_sync.slapd import free_port
from bench.platform import BIN, cli


def in_folder(folder, *args, env=None):
    """A command run the way `make run`'s second terminal runs it: no --config, from the project folder."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOENROLL_")}
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=folder, env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_init_records_the_ldap_url_and_ports_so_a_second_terminal_needs_no_variables(tmp_path, slapd):
    port = free_port()
    given = {"AUTOENROLL_LDAP__URL": slapd.url, "AUTOENROLL_BIND": f"127.0.0.1:{port}",
             "AUTOENROLL_PUBLIC_URL": f"https://localhost:{port}"}
    first = in_folder(tmp_path, "autoenroll", "init", env=given)
    assert first.returncode == 0, first.stderr
    assert f"var/autoenroll.toml (LDAP {slapd.url}, HTTPS 127.0.0.1:{port})" in first.stdout
    assert f'server = "https://localhost:{port}"' in (tmp_path / "var" / "agent.toml").read_text()

    invite = in_folder(tmp_path, "autoenroll", "invite", "alice@example.org")  # no AUTOENROLL_LDAP__URL
    assert invite.returncode == 0, invite.stderr
    again = in_folder(tmp_path, "autoenroll", "init")
    assert again.returncode == 0 and "already initialised" in again.stdout
    recorded = (tmp_path / "var" / "autoenroll.toml").read_text()
    assert f'url = "{slapd.url}"' in recorded and f'bind = "127.0.0.1:{port}"' in recorded


def test_provision_dry_run_says_what_it_would_issue_and_issues_nothing(tmp_path, slapd, new_user):
    new_user(("smime-users",))
    config = tmp_path / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\n[ldap]\nurl = "{slapd.url}"\n')
    cli("autoenroll", "--config", str(config), "init")
    out = cli("autoenroll", "--config", str(config), "provision", "--group", "smime-users", "--dry-run").stdout
    assert out.startswith("dry run, nothing issued:") and "would issue" in out and " issued," not in out
    status = cli("autoenroll", "--config", str(config), "sync", "status").stdout
    assert '"depth": 0' in status


def test_serve_opens_no_gunicorn_control_socket(platform):
    from registration_app.settings import load_settings
    from registration_app.web.server import gunicorn_options
    assert gunicorn_options(load_settings(platform.config))["control_socket_disable"] is True
    log = platform.log.read_text()
    assert "Listening at" in log and "Control socket" not in log


def test_short_commands_start_no_background_thread(tmp_path, slapd, monkeypatch):
    """crl, invite, sync status and a dry reconcile need no key pool filler or outbox worker."""
    import threading

    from click.testing import CliRunner

    from registration_app.cli import main
    config = tmp_path / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\n[ldap]\nurl = "{slapd.url}"\n')
    cli("autoenroll", "--config", str(config), "init")
    started = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread.name), start(thread))[1])
    for args in (["crl"], ["invite", "alice@example.org"], ["sync", "status"], ["sync", "reconcile", "--dry-run"]):
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
        assert started == [], (args, started)
