"""Every command error is one line on stderr and a non-zero exit code; --debug (or AUTOENROLL_DEBUG=1)
shows the stack. Through the real commands against a real slapd, and through click's CliRunner."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from directory_sync.slapd import PrivateSlapd, free_port
from registration_app.cli import main
from registration_app.cli_errors import ReportingGroup, debug_option
from bench.platform import cli


def one_line_error(result) -> str:
    """The refusal's one line (asserting that it is one, with no stack)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, slapd):
    folder = tmp_path_factory.mktemp("operator")
    config = folder / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\n[ldap]\nurl = "{slapd.url}"\ntimeout_seconds = 2.0\n')
    cli("autoenroll", "--config", str(config), "init")
    return config


def operator(config, *args, env=None):
    return cli("autoenroll", "--config", str(config), *args, env=env, check=False)


def test_invite_of_something_that_is_not_an_address_is_one_line(data):
    assert one_line_error(operator(data, "invite", "*")) == "Error: Not a valid email address"


def test_invite_of_an_address_nobody_has(data):
    assert "no directory entry has the email address 'nobody@example.org'" in one_line_error(
        operator(data, "invite", "nobody@example.org"))


def test_invite_with_slapd_stopped_names_the_directory_it_tried(tmp_path, data):
    stopped = PrivateSlapd(tmp_path / "slapd")  # our own: stopping the session's would disturb other tests
    stopped.start()
    stopped.stop()
    line = one_line_error(operator(data, "invite", "alice@example.org", env={"AUTOENROLL_LDAP__URL": stopped.url}))
    assert "The LDAP directory is unavailable" in line and stopped.url in line and "AUTOENROLL_LDAP__URL" in line


def test_invite_with_the_users_base_under_a_referral(data, ldap_admin):
    referral, manage_dsa_it = "ou=elsewhere,dc=example,dc=org", [("2.16.840.1.113730.3.4.2", True, None)]
    assert ldap_admin.add(referral, ["referral", "extensibleObject"],
                          {"ou": "elsewhere", "ref": f"ldap://127.0.0.1:1/{referral}"}), ldap_admin.result
    try:
        base = f"ou=people,{referral}"
        line = one_line_error(operator(data, "invite", "alice@example.org",
                                       env={"AUTOENROLL_LDAP__USERS_BASE": base}))
        assert "Referral" in line and base in line
    finally:
        assert ldap_admin.delete(referral, controls=manage_dsa_it), ldap_admin.result  # other tests search the tree


def test_a_database_that_cannot_be_reached(data):
    line = one_line_error(operator(data, "sync", "status", env={
        "AUTOENROLL_DATABASE_URL": f"postgresql+psycopg://nobody:pw@127.0.0.1:{free_port()}/autoenroll"}))
    assert line.startswith("Error: the database is unavailable:")


def test_a_file_that_cannot_be_written(data, tmp_path):
    target = tmp_path / "no-such-folder" / "ca.crl"
    assert one_line_error(operator(data, "crl", "--out", str(target))) == \
        f"Error: {target}: No such file or directory"


def test_debug_shows_the_stack(data):
    for result in (cli("autoenroll", "--config", str(data), "--debug", "invite", "*", check=False),
                   operator(data, "invite", "*", env={"AUTOENROLL_DEBUG": "1"})):
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "BadRequest: Not a valid email address" in result.stderr


def test_a_config_file_that_does_not_exist_is_an_error_not_the_defaults(tmp_path):
    missing = tmp_path / "missing.toml"
    assert one_line_error(operator(missing, "sync", "status")) == \
        f"Error: configuration file {missing} does not exist"
    through_env = cli("autoenroll", "sync", "status", env={"AUTOENROLL_CONFIG": str(missing)}, check=False)
    assert one_line_error(through_env) == f"Error: configuration file {missing} does not exist"
    agent = cli("autoenroll-agent", "--config", str(missing), "list", check=False)
    assert agent.returncode == 2 and "does not exist" in agent.stderr and "Traceback" not in agent.stderr


def test_cli_runner_sees_the_same_line_and_the_exception_with_debug(data):
    runner = CliRunner()
    result = runner.invoke(main, ["--config", str(data), "invite", "*"])
    assert result.exit_code == 1 and result.stderr == "Error: Not a valid email address\n"
    debug = runner.invoke(main, ["--config", str(data), "--debug", "invite", "*"])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "BadRequest"


def test_an_unexpected_error_is_one_line_that_points_to_debug():
    @click.group(cls=ReportingGroup)
    @debug_option
    def group(debug):
        pass

    @group.command()
    def broken():
        raise RuntimeError("the unforeseen")

    @group.command()
    def unreadable():
        open("/nonexistent/autoenroll/file")

    runner = CliRunner()
    result = runner.invoke(group, ["broken"])
    assert result.exit_code == 1
    assert result.stderr == "Error: unexpected RuntimeError: the unforeseen (run again with --debug for the stack)\n"
    assert runner.invoke(group, ["unreadable"]).stderr == \
        "Error: /nonexistent/autoenroll/file: No such file or directory\n"
    assert isinstance(runner.invoke(group, ["--debug", "broken"]).exception, RuntimeError)
