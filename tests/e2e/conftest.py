"""The platform over each transport to slapd: plain LDAP on loopback (the session's `platform`), ldaps://
and StartTLS, verified against the CA the test issued slapd's certificate with."""

from __future__ import annotations

import pytest

from bench.platform import SUITE_SETTINGS, make_platform

# The last: plain LDAP, with the CA, TLS CA and KRA keys in a SoftHSM2 token (tests/softhsm.py).
TRANSPORTS = ["ldap", "ldaps", "starttls", "softhsm"]


@pytest.fixture(scope="session", params=TRANSPORTS)
def platform_over(request, tmp_path_factory, slapd, ldap_tls):
    """A running platform whose directory connection is `request.param` (one server per transport)."""
    if slapd.pid is None:  # a test before may have stopped it
        slapd.start()
    if request.param == "ldap":
        yield request.getfixturevalue("platform")
        return
    if request.param == "softhsm":
        from tests.softhsm import key_store_options
        data = tmp_path_factory.mktemp("platform-softhsm")
        options = tuple(key_store_options(request.getfixturevalue("softhsm"), "platform-over", data))
        with make_platform(data, slapd.url, init_options=options, **SUITE_SETTINGS).running() as running:
            yield running
        return
    url = slapd.ldaps_url if request.param == "ldaps" else slapd.url
    data = tmp_path_factory.mktemp(f"platform-{request.param}")
    platform = make_platform(data, url, ldap={"ca_file": str(ldap_tls.ca_file), "start_tls": request.param == "starttls"},
                             **SUITE_SETTINGS)
    with platform.running() as running:
        yield running
