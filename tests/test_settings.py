"""registration_app/settings.py: the AUTOENROLL_PROFILES__<NAME>__<KEY> environment layer."""

from pathlib import Path

import pytest

from registration_app.core.errors import ConfigError
from registration_app.settings import load_settings


def test_environment_overrides_a_built_in_profile_key_by_key():
    settings = load_settings(None, environ={
        "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__VALIDITY_DAYS": "30",
        "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__KEEP_SUPERSEDED": "true",
        "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__GROUPS": "cn=Mail Users,ou=groups,dc=example,dc=org; smime-users",
        "AUTOENROLL_PROFILES__SMIME_SIGNATURE__MAX_PER_DAY": "3",
    })
    encryption = settings.profiles["smime-encryption"]
    assert encryption.validity_days == 30 and encryption.keep_superseded is True
    assert encryption.groups == frozenset({"cn=mail users,ou=groups,dc=example,dc=org",
                                           "cn=smime-users,ou=groups,dc=example,dc=org"})
    assert encryption.key_type.value == "rsa-3072"  # keys it does not set keep their built-in value
    assert settings.profiles["smime-signature"].max_per_day == 3
    assert settings.profiles["smime-encryption-ec"].validity_days == 365


def test_environment_wins_over_the_file_and_can_add_or_remove_a_profile(tmp_path: Path):
    config = tmp_path / "a.toml"
    config.write_text('[profiles.smime-encryption]\nvalidity_days = 90\nkeep_superseded = true\n'
                      '[profiles.team-signing]\nusage = "signature"\ngroups = ["smime-users"]\n')
    settings = load_settings(config, environ={
        "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__VALIDITY_DAYS": "45",
        "AUTOENROLL_PROFILES__TEAM_SIGNING__VALIDITY_DAYS": "60",
        "AUTOENROLL_PROFILES__SMIME_ENCRYPTION_EC__ENABLED": "false",
        "AUTOENROLL_PROFILES__LAB__USAGE": "signature",
    })
    assert settings.profiles["smime-encryption"].validity_days == 45
    assert settings.profiles["smime-encryption"].keep_superseded is True  # the file's, not overridden
    assert settings.profiles["team-signing"].validity_days == 60
    assert "smime-encryption-ec" not in settings.profiles
    assert settings.profiles["lab"].usage.value == "signature"


@pytest.mark.parametrize(("environ", "message"), [
    ({"AUTOENROLL_PROFILES__SMIME_ENCRYPTION__VALIDITY_DAYS": "soon"},
     "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__VALIDITY_DAYS: 'soon' is not a whole number"),
    ({"AUTOENROLL_PROFILES__SMIME_ENCRYPTION__COEXIST": "maybe"},
     "AUTOENROLL_PROFILES__SMIME_ENCRYPTION__COEXIST: 'maybe' is neither true nor false"),
    ({"AUTOENROLL_PROFILES__SMIME_ENCRYPTION": "x"}, "names no key of the profile"),
    ({"AUTOENROLL_PROFILES": "x"}, "AUTOENROLL_PROFILES is not a setting"),
    ({"AUTOENROLL_PROFILES__SMIME_ENCRYPTION__COLOUR": "red"}, r"unknown keys \['colour'\]"),
    ({"AUTOENROLL_PROFILES__SMIME_ENCRYPTION__VALIDITY_DAYS": "900"}, "825"),
])
def test_a_wrong_profile_variable_stops_the_start_naming_it(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ=environ)
