"""`autoenroll-agent` as an operator of a user server meets it: what `officer show` displays, where a
recovered key's password went, which profiles `enroll` knows, and clear refusals of bad options."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.serialization import pkcs12

from tests.e2e.test_enrollment import invite_and_bootstrap


def test_officer_show_displays_the_requester_the_reason_and_the_serials(platform, new_user):
    _, requester = new_user(("recovery-officers", "smime-users"))
    _, approver = new_user(("recovery-officers", "smime-users"))
    _, user = new_user(("smime-users",))
    for email in (requester, approver, user):
        invite_and_bootstrap(platform, email)
    enrolled = platform.agent("enroll", "--email", user, "--profile", "smime-encryption-ec").stdout
    serial = enrolled.split("serial ")[1].split(",")[0]
    opened = platform.agent("officer", "request", "--as", requester, "--user", user, "--serial", serial,
                            "--reason", "legal hold 2026-41").stdout
    request_id = opened.split()[2].rstrip(":")
    shown = platform.agent("officer", "show", "--as", approver, request_id).stdout
    assert f"user {user}" in shown
    assert f"requested by {requester}" in shown and "reason: legal hold 2026-41" in shown
    assert f"keys: {serial}" in shown


def test_recover_says_where_it_put_the_password(platform, new_user):
    _, user = new_user(("smime-users",))
    invite_and_bootstrap(platform, user)
    enrolled = platform.agent("enroll", "--email", user, "--profile", "smime-encryption-ec").stdout
    serial = enrolled.split("serial ")[1].split(",")[0]
    out = platform.agent("recover", "--email", user, "--serial", serial).stdout
    assert "password is in the .pass file beside it (mode 0600)" in out.splitlines()[0]
    p12 = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    password = p12.with_suffix(".pass")
    assert password.stat().st_mode & 0o777 == 0o600
    key, cert, _ = pkcs12.load_key_and_certificates(p12.read_bytes(), password.read_bytes())
    assert key is not None and format(cert.serial_number, "x") == serial.lstrip("0")


def test_enroll_help_lists_the_built_in_profiles(platform):
    shown = platform.agent("enroll", "--help").stdout
    for profile in ("smime-encryption ", "smime-encryption-ec", "smime-signature"):
        assert profile in shown
    assert "unknown_profile" in shown


def test_insecure_now_without_a_zone_is_a_clear_error(platform):
    result = platform.agent("daemon", "--once", "--insecure-now", "2027-01-01T00:00:00", check=False)
    assert result.returncode == 2 and "has no zone" in result.stderr and "Traceback" not in result.stderr
    assert "is not an ISO 8601 time" in platform.agent("daemon", "--once", "--insecure-now", "soon",
                                                       check=False).stderr


def test_a_broken_agent_configuration_is_one_line(tmp_path):
    from bench.platform import cli
    config = tmp_path / "agent.toml"
    config.write_text('server = "https://localhost:8443"\n')  # no cert, key, ...
    result = cli("autoenroll-agent", "--config", str(config), "list", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"Error: {config} is not an agent configuration (KeyError: 'cert'); "
                                     "`autoenroll init` writes one")
