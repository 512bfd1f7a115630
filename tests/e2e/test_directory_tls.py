"""`autoenroll serve` against a slapd whose TLS certificate the server must not trust: it refuses to
start, and says why (the enrollment over ldaps:// and StartTLS that works is test_enrollment.py's,
parametrised by tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from directory_sync.slapd import PrivateSlapd
from bench.platform import SUITE_SETTINGS, ServerExited, make_platform


@pytest.fixture(scope="module")
def slapd_named_elsewhere(tmp_path_factory, ldap_tls):
    """A slapd presenting a certificate of the right CA for another host name."""
    instance = PrivateSlapd(tmp_path_factory.mktemp("slapd-elsewhere"), tls=ldap_tls.wrong_name)
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("transport", ["ldaps", "starttls"])
def test_a_directory_certificate_from_another_ca_stops_the_server_naming_the_cause(
        tmp_path, slapd, ldap_tls, transport):
    url = slapd.ldaps_url if transport == "ldaps" else slapd.url
    platform = make_platform(tmp_path, url, ldap={"ca_file": str(ldap_tls.other_ca_file),
                                                 "start_tls": transport == "starttls"}, **SUITE_SETTINGS)
    with pytest.raises(ServerExited, match="server exited") as stopped:
        platform.start()
    assert f"does not verify against ldap.ca_file {ldap_tls.other_ca_file}" in str(stopped.value)


def test_a_directory_certificate_for_another_name_stops_the_server_naming_the_cause(
        tmp_path, slapd_named_elsewhere, ldap_tls):
    platform = make_platform(tmp_path, slapd_named_elsewhere.ldaps_url, ldap={"ca_file": str(ldap_tls.ca_file)},
                             **SUITE_SETTINGS)
    with pytest.raises(ServerExited, match="server exited") as stopped:
        platform.start()
    assert "presented a certificate for another name" in str(stopped.value)
    assert "127.0.0.1" in str(stopped.value)
