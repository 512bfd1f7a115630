"""ra/setup.py called directly, as `autoenroll init` and `autoenroll client-cert` call it: the key-store
options, a data folder made (and made private again), the URLs recorded once, client certificates."""

from __future__ import annotations

import os
import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from registration_app.core.errors import BadRequest, ConfigError
from registration_app.ra.setup import (KeyStoreChoice, OptionConflict, choose_key_store, initialise,
                                       issue_client_certificate)
from registration_app.settings import load_settings
from registration_app.wiring import key_store

DEFAULTS = dict(ca_key_type="ec-p256", ca_name="Setup Test CA", server_names=("localhost",),
                agent_names=("agent.example.org",), key_store_table=None)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "autoenroll.toml"
    path.write_text('data_dir = "data"\n[ldap]\nurl = "ldap://127.0.0.1:1"\n')
    return path


def test_key_store_options_apply_over_the_configuration_or_are_refused_when_they_do_not_fit(config):
    settings = load_settings(config, environ={})
    assert choose_key_store(settings, KeyStoreChoice()) == (settings, None)
    files, table = choose_key_store(settings, KeyStoreChoice(key_store="files"))
    assert files.key_store.in_token == frozenset() and table is None
    token, table = choose_key_store(settings, KeyStoreChoice(key_store="pkcs11", module="/lib/p11.so", token="t",
                                                             file_keys=("tls_ca",)))
    assert token.key_store.in_token == frozenset({"ca", "kra"}) and token.key_store.module == "/lib/p11.so"
    assert table is not None and tomllib.loads(table)["key_store"] == {
        "in_token": ["ca", "kra"], "module": "/lib/p11.so", "token": "t", "pin_file": "token.pin"}
    with pytest.raises(OptionConflict, match="go with --key-store pkcs11"):
        choose_key_store(settings, KeyStoreChoice(module="/lib/p11.so"))
    with pytest.raises(OptionConflict, match="needs --module and --token"):
        choose_key_store(settings, KeyStoreChoice(key_store="pkcs11", token="t"))


def test_initialise_makes_the_folder_private_records_the_url_once_and_a_second_run_changes_nothing(config):
    settings = load_settings(config, environ={})
    settings.data_dir.mkdir(mode=0o755)
    os.chmod(settings.data_dir, 0o755)
    first = initialise(settings, http_host="pki.example.com", config_path=config, **DEFAULTS)
    assert first.made_private and not first.existed and first.upgraded == []
    assert stat.S_IMODE(os.stat(settings.data_dir).st_mode) == 0o700
    assert first.http.written and first.http.config == config and not first.http.stand_in
    assert first.http.crl_url == "http://pki.example.com:8080/crl/ca.crl"
    assert tomllib.loads(config.read_text())["http_url"] == "http://pki.example.com:8080"
    assert first.ca_cert.exists() and 'server = "https://localhost:8443"' in first.agent_config.read_text()
    assert first.operator_config is None and first.key_store is None  # a --config was given; no token

    again = initialise(load_settings(config, environ={}), http_host="other.example.com", config_path=config,
                       **DEFAULTS)
    assert again.existed and not again.made_private and not again.http.written
    assert again.http.ignored_host == "other.example.com"
    assert again.http.crl_url == "http://pki.example.com:8080/crl/ca.crl"


def test_client_certificates_come_from_the_tls_ca_and_only_where_its_key_is(config, tmp_path):
    settings = load_settings(config, environ={})
    initialise(settings, http_host="pki.example.com", config_path=config, **DEFAULTS)
    settings = load_settings(config, environ={})
    issued = issue_client_certificate(settings, key_store(settings), "mx1.example.org", out_dir=tmp_path / "out",
                                      days=30)
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    tls_ca = x509.load_pem_x509_certificate(settings.path("tls-ca.pem").read_bytes())
    cert.verify_directly_issued_by(tls_ca)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["mx1.example.org"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(os.stat(issued.key).st_mode) == 0o600
    with pytest.raises(BadRequest, match="cannot issue a certificate for 'bücher.example.org'"):
        issue_client_certificate(settings, key_store(settings), "bücher.example.org", out_dir=tmp_path / "out", days=30)

    settings.path("tls-ca.key").rename(tmp_path / "elsewhere.key")
    with pytest.raises(ConfigError, match="no TLS CA key in"):
        issue_client_certificate(settings, key_store(settings), "mx2.example.org", out_dir=None, days=30)
