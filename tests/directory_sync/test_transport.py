"""Transport security of the LDAP connection against a real slapd serving ldaps:// and StartTLS with a
certificate the test issued (bench/ldap_tls.py): what verifies, what is refused and why, and the
settings refused at start-up before anything is sent."""

from __future__ import annotations

import dataclasses

import pytest

from directory_sync.config import DEV_SERVICE_PASSWORD, LdapSettings
from directory_sync.connection import ConnectionPool, check_directory
from directory_sync.ldap import LdapDirectory
from directory_sync.slapd import SERVICE_DN, PrivateSlapd, free_port
from registration_app.core.errors import ConfigError, DirectoryTlsFailed, DirectoryUnavailable
from registration_app.web.status import status_of

ALICE = "alice@example.org"


def tls_settings(slapd, ldap_tls, transport: str, **overrides) -> LdapSettings:
    """The service account over `transport` ("ldaps" or "starttls"), trusting the test's CA."""
    url = slapd.ldaps_url if transport == "ldaps" else slapd.url
    values = dict(url=url, start_tls=transport == "starttls", ca_file=str(ldap_tls.ca_file))
    return slapd.settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def slapd_named_elsewhere(tmp_path_factory, ldap_tls):
    """A slapd whose certificate (from the right CA) names another host."""
    instance = PrivateSlapd(tmp_path_factory.mktemp("slapd-elsewhere"), tls=ldap_tls.wrong_name)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def slapd_without_tls(tmp_path_factory):
    instance = PrivateSlapd(tmp_path_factory.mktemp("slapd-plain"))
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_the_directory_is_read_over_verified_tls(slapd, ldap_tls, transport):
    directory = LdapDirectory(tls_settings(slapd, ldap_tls, transport))
    try:
        user = directory.find_user(ALICE)
        assert user is not None and user.dn == "uid=alice,ou=people,dc=example,dc=org"
        assert directory.pool.run(lambda conn: conn.whoami_s()) == f"dn:{SERVICE_DN}"
    finally:
        directory.close()


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_sasl_external_binds_as_the_subject_of_the_client_certificate(slapd, ldap_tls, transport):
    settings = tls_settings(slapd, ldap_tls, transport, sasl_mechanism="EXTERNAL", password="",
                            client_cert_file=str(ldap_tls.client_cert_file),
                            client_key_file=str(ldap_tls.client_key_file))
    pool = ConnectionPool(settings)
    try:
        assert pool.run(lambda conn: conn.whoami_s()).lower() == f"dn:{SERVICE_DN}"
        assert pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])["mail"] == [ALICE.encode()]
    finally:
        pool.close()


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_a_certificate_from_another_ca_is_refused_naming_the_cause(slapd, ldap_tls, transport):
    pool = ConnectionPool(tls_settings(slapd, ldap_tls, transport, ca_file=str(ldap_tls.other_ca_file)))
    with pytest.raises(DirectoryTlsFailed, match="does not verify against ldap.ca_file") as refused:
        pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])
    assert refused.value.extra["cause"] == "certificate_unverified"
    assert status_of(refused.value) == 503


def test_without_ca_file_the_system_store_decides(slapd, ldap_tls):
    pool = ConnectionPool(tls_settings(slapd, ldap_tls, "ldaps", ca_file=""))
    with pytest.raises(DirectoryTlsFailed, match="the system's CA store") as refused:
        pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])
    assert refused.value.extra["cause"] == "certificate_unverified"


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_a_certificate_for_another_name_is_refused_naming_the_cause(slapd_named_elsewhere, ldap_tls, transport):
    pool = ConnectionPool(tls_settings(slapd_named_elsewhere, ldap_tls, transport))
    with pytest.raises(DirectoryTlsFailed, match="certificate for another name") as refused:
        pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])
    assert refused.value.extra["cause"] == "name_mismatch"
    assert "127.0.0.1" in refused.value.detail


def test_starttls_refused_by_the_server_is_named(slapd_without_tls, ldap_tls):
    pool = ConnectionPool(slapd_without_tls.settings(start_tls=True, ca_file=str(ldap_tls.ca_file)))
    with pytest.raises(DirectoryTlsFailed, match="refused StartTLS") as refused:
        pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])
    assert refused.value.extra["cause"] == "starttls_refused"


def test_the_start_up_check_stops_on_tls_failures_not_on_a_directory_that_is_down(slapd, ldap_tls):
    with pytest.raises(DirectoryTlsFailed):
        check_directory(tls_settings(slapd, ldap_tls, "ldaps", ca_file=str(ldap_tls.other_ca_file)))
    check_directory(tls_settings(slapd, ldap_tls, "ldaps"))
    check_directory(dataclasses.replace(tls_settings(slapd, ldap_tls, "ldaps"),
                                        url=f"ldaps://127.0.0.1:{free_port()}"))  # down: starts, retries later


def test_a_replica_answers_when_the_first_server_of_url_does_not(slapd, ldap_tls):
    down = f"ldaps://127.0.0.1:{free_port()}"
    directory = LdapDirectory(tls_settings(slapd, ldap_tls, "ldaps", url=f"{down} {slapd.ldaps_url}"))
    try:
        assert directory.find_user(ALICE) is not None
    finally:
        directory.close()


# --- refused at start-up, before anything is sent --------------------------------------------------
REMOTE = dict(url="ldap://ldap.corp.example.org", password="s3rvice")


def test_a_plaintext_simple_bind_to_a_remote_directory_is_refused():
    with pytest.raises(ConfigError, match="refusing a simple bind in plaintext to ldap://ldap.corp.example.org"):
        ConnectionPool(LdapSettings(**REMOTE))
    ConnectionPool(LdapSettings(**REMOTE, insecure_plaintext=True))  # the operator's named choice
    ConnectionPool(LdapSettings(**REMOTE, start_tls=True))
    ConnectionPool(LdapSettings(url="ldaps://ldap.corp.example.org", password="s3rvice"))


def test_plaintext_to_loopback_stays_allowed_as_make_run_uses_it():
    for url in ("ldap://127.0.0.1:3890", "ldap://localhost:3890 ldap://[::1]:3890"):
        credentials = ConnectionPool(LdapSettings(url=url)).credentials
        assert (credentials.mechanism, credentials.bind_dn, credentials.password) == \
            ("", SERVICE_DN, DEV_SERVICE_PASSWORD)  # a simple bind as the service, in plaintext


def test_one_remote_server_in_the_list_is_enough_to_refuse_plaintext():
    with pytest.raises(ConfigError, match="ldap://replica.corp.example.org"):
        ConnectionPool(LdapSettings(url="ldap://127.0.0.1:3890 ldap://replica.corp.example.org", password="s3rvice"))


@pytest.mark.parametrize("url", ["ldaps://ldap.corp.example.org", "ldap://10.0.0.5"])
def test_the_development_password_is_refused_for_a_directory_not_on_this_machine(url):
    with pytest.raises(ConfigError, match="development password is refused"):
        ConnectionPool(LdapSettings(url=url, insecure_plaintext=True))


def test_the_password_file_is_read_once_and_its_text_never_shown(slapd, tmp_path):
    secret = tmp_path / "ldap.pw"
    secret.write_text(DEV_SERVICE_PASSWORD + "\n")
    secret.chmod(0o600)
    settings = slapd.settings(password=DEV_SERVICE_PASSWORD, password_file=str(secret))
    pool = ConnectionPool(settings)
    secret.unlink()  # read at start: later connections do not need the file
    try:
        assert pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"]) is not None
    finally:
        pool.close()
    assert DEV_SERVICE_PASSWORD not in repr(settings) and DEV_SERVICE_PASSWORD not in repr(pool.credentials)


def test_a_password_from_its_file_is_in_no_log_line_and_no_message_when_the_bind_is_refused(
        slapd, ldap_tls, tmp_path, caplog):
    import logging
    secret = tmp_path / "ldap.pw"
    secret.write_text("Wr0ng-but-Secret-9\n")
    secret.chmod(0o600)
    caplog.set_level(logging.DEBUG)
    settings = tls_settings(slapd, ldap_tls, "ldaps", password=DEV_SERVICE_PASSWORD, password_file=str(secret))
    directory = LdapDirectory(settings)
    try:
        with pytest.raises(DirectoryUnavailable, match="refused the service account's bind") as refused:
            directory.find_user(ALICE)
        with pytest.raises(DirectoryUnavailable) as again:
            directory.check_bind()  # what /health asks
    finally:
        directory.close()
    assert directory.pool.credentials.password == "Wr0ng-but-Secret-9"  # the file's first line, read at start
    said = [str(refused.value), repr(refused.value), refused.value.detail, str(again.value), repr(settings),
            repr(directory.pool.credentials), caplog.text]
    assert not any("Wr0ng-but-Secret-9" in text for text in said), said


def test_the_development_password_in_a_password_file_is_refused_off_loopback_too(tmp_path):
    secret = tmp_path / "ldap.pw"
    secret.write_text(DEV_SERVICE_PASSWORD + "\n")
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match="development password is refused for ldaps://ldap.corp.example.org"):
        ConnectionPool(LdapSettings(url="ldaps://ldap.corp.example.org", password_file=str(secret)))


def test_a_password_file_others_may_read_is_refused(tmp_path):
    secret = tmp_path / "ldap.pw"
    secret.write_text("s3rvice")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users \\(mode 644\\); chmod 600") as refused:
        ConnectionPool(LdapSettings(url="ldaps://ldap.corp.example.org", password_file=str(secret)))
    assert "s3rvice" not in refused.value.detail


@pytest.mark.parametrize("problem, settings", [
    ("password_file: cannot open /nonexistent/ldap.pw", dict(password_file="/nonexistent/ldap.pw")),
    ("is empty", dict(password_file="EMPTY")),
    ("not both", dict(password_file="GOOD", password="other")),
    ("needs ldap.client_cert_file", dict(sasl_mechanism="EXTERNAL", start_tls=True)),
    ("SASL EXTERNAL needs TLS", dict(sasl_mechanism="EXTERNAL", client_cert_file="CERT", client_key_file="CERT")),
    ("not supported", dict(sasl_mechanism="GSSAPI")),
    ("go together", dict(client_cert_file="CERT")),
    ("StartTLS is for ldap://", dict(url="ldaps://127.0.0.1:636", start_tls=True)),
    ("not an ldap://", dict(url="http://127.0.0.1:389")),
    ("ca_file: /nonexistent/ca.pem does not exist", dict(url="ldaps://127.0.0.1", ca_file="/nonexistent/ca.pem")),
])
def test_settings_that_cannot_work_are_refused_with_the_setting_named(tmp_path, problem, settings):
    files = {"EMPTY": tmp_path / "empty", "GOOD": tmp_path / "good", "CERT": tmp_path / "cert.pem"}
    for path in files.values():
        path.write_text("" if path.name == "empty" else "x\n")
        path.chmod(0o600)
    values = {k: str(files[v]) if isinstance(v, str) and v in files else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=problem):
        ConnectionPool(LdapSettings(**values))


def test_a_directory_that_is_down_over_tls_is_unavailable_not_a_tls_failure(ldap_tls):
    pool = ConnectionPool(LdapSettings(url=f"ldaps://127.0.0.1:{free_port()}", ca_file=str(ldap_tls.ca_file)))
    with pytest.raises(DirectoryUnavailable) as down:
        pool.read("uid=alice,ou=people,dc=example,dc=org", ["mail"])
    assert not isinstance(down.value, DirectoryTlsFailed)
