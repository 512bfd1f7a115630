"""bench/platform.py's configuration of a platform: every table a fixture names reaches the settings the
server loads, and a poller that is never satisfied says what it waited for."""

from __future__ import annotations

import pytest

from bench.platform import configure, eventually
from registration_app.settings import load_settings


def test_configure_writes_every_table_the_server_reads(tmp_path):
    platform = configure(
        tmp_path, "ldaps://127.0.0.1:6360", ldap={"start_tls": False, "preset": "ad", "base_dn": "DC=ad,DC=test"},
        key_store={"in_token": ["ca"], "module": "/usr/lib/softhsm/libsofthsm2.so", "token": "t",
                   "pin_file": "token.pin"},
        role="ca", targets={"book": {"url": "ldap://127.0.0.1:3891", "preset": "openldap"}},
        profiles={"smime-signature": {"groups": ["cn=signers,ou=groups,dc=example,dc=org"]}},
        extra_toml='agent_scopes = ["agent.example.org=example.net"]\n', http_url=None, database_url="sqlite:///x.db",
        authority_clients=["ra.internal"])
    settings = load_settings(platform.config, environ={})
    assert (settings.role, settings.database_url, settings.authority_clients) == \
        ("ca", "sqlite:///x.db", frozenset({"ra.internal"}))
    assert settings.agent_scopes == frozenset({"agent.example.org=example.net"})  # the raw TOML, top level
    assert (settings.ldap.url, settings.ldap.base_dn, settings.ldap.timeout_seconds) == \
        ("ldaps://127.0.0.1:6360", "DC=ad,DC=test", 2.0)
    assert settings.targets["book"].url == "ldap://127.0.0.1:3891"
    assert (settings.key_store.in_token, settings.key_store.token) == (frozenset({"ca"}), "t")
    assert settings.profiles["smime-signature"].groups == frozenset({"cn=signers,ou=groups,dc=example,dc=org"})
    assert "http_url" not in platform.config.read_text()  # left for `autoenroll init` to choose
    assert platform.url == settings.public_url and platform.http_url == f"http://{settings.http_bind}"


def test_eventually_returns_the_first_truthy_answer_or_names_what_it_waited_for():
    answers = iter([None, 0, "ready"])
    assert eventually(lambda: next(answers), timeout=5, step=0) == "ready"
    with pytest.raises(AssertionError, match="timed out after 0 s waiting for the moon"):
        eventually(lambda: None, timeout=0, step=0, what="the moon")
