"""`autoenroll config show` and the start-up checks of the configuration, through the real command."""

from __future__ import annotations

import json

from bench.platform import cli


def test_config_show_prints_the_merged_profiles_and_masks_every_secret(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('database_url = "postgresql+psycopg://ra:db-s3cret@db.internal/autoenroll"\n'
                      'ca_passphrase = "pass-s3cret"\n[ldap]\npassword = "ldap-s3cret"\n'
                      '[profiles.smime-encryption]\nvalidity_days = 200\n'
                      '[profiles.smime-encryption-ec]\nenabled = false\n')
    out = cli("autoenroll", "--config", str(config), "config", "show").stdout
    assert "s3cret" not in out
    shown = json.loads(out)
    assert set(shown["profiles"]) == {"smime-encryption", "smime-signature"}
    assert shown["profiles"]["smime-encryption"]["validity_days"] == 200
    assert shown["profiles"]["smime-encryption"]["key_type"] == "rsa-3072"  # from the built-in profile
    assert "cn=recovery-officers,ou=groups,dc=example,dc=org" in shown["profiles"]["smime-signature"]["groups"]
    assert shown["database_url"] == "postgresql+psycopg://ra:********@db.internal/autoenroll"
    assert shown["ldap"]["password"] == shown["ca_passphrase"] == "********"


def test_a_malformed_group_dn_stops_every_command_with_one_line_naming_the_profile(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[profiles.smime-signature]\ngroups = ["cn=smime-users,,dc=example,dc=org"]\n')
    for command in (["config", "show"], ["serve"]):
        result = cli("autoenroll", "--config", str(config), *command, check=False)
        assert result.returncode != 0 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            "Error: profile 'smime-signature': group 'cn=smime-users,,dc=example,dc=org' is not a distinguished name"]
