"""The one entitlement rule (core/entitlement.py), without I/O: whole DNs, bare names only under groups_base."""

from __future__ import annotations

import pytest

from registration_app.core.entitlement import is_entitled, resolve_profile_groups
from registration_app.core.errors import ConfigError
from registration_app.core.model import Profile, Usage
from registration_app.core.profiles import parse_profiles

BASE = "ou=groups,dc=example,dc=org"


def profile(*groups: str) -> Profile:
    tables = {"p": {"usage": "encryption", "groups": list(groups)}}
    return resolve_profile_groups(parse_profiles(tables), BASE)["p"]


def test_a_member_of_the_named_group_is_entitled_however_the_directory_spells_its_dn():
    p = profile("cn=smime-users,ou=groups,dc=example,dc=org")
    assert is_entitled(p, {"cn=SMIME-users, ou=Groups, dc=example, dc=org"})
    assert is_entitled(p, {"cn=other,ou=groups,dc=example,dc=org", "CN=smime-users,OU=groups,DC=example,DC=org"})


@pytest.mark.parametrize("elsewhere", [
    "cn=smime-users,ou=people,dc=example,dc=org",  # a group the user could create in their own branch
    "cn=smime-users,ou=groups,ou=people,dc=example,dc=org",
    "cn=smime-users,dc=example,dc=org",
    "cn=smime-users,ou=groups,dc=example,dc=com",
    "cn=smime-users-old,ou=groups,dc=example,dc=org",
    "ou=smime-users,ou=groups,dc=example,dc=org",
    "smime-users",
])
def test_a_group_of_the_same_name_elsewhere_in_the_tree_entitles_nobody(elsewhere):
    assert not is_entitled(profile("cn=smime-users,ou=groups,dc=example,dc=org"), {elsewhere})
    assert not is_entitled(profile("smime-users"), {elsewhere})


def test_a_bare_name_means_the_group_directly_under_groups_base_and_nowhere_else():
    p = profile("smime-users", "Staff")
    assert p.groups == {"cn=smime-users,ou=groups,dc=example,dc=org", "cn=staff,ou=groups,dc=example,dc=org"}
    assert is_entitled(p, {"cn=Staff,ou=groups,dc=example,dc=org"})
    assert not is_entitled(p, {"cn=staff,ou=elsewhere,dc=example,dc=org"})


def test_nobody_is_entitled_to_a_profile_without_groups_or_with_unresolved_names():
    assert not is_entitled(profile(), {"cn=smime-users,ou=groups,dc=example,dc=org"})
    unresolved = Profile(name="u", usage=Usage.ENCRYPTION, groups=frozenset({"smime-users"}))
    assert not is_entitled(unresolved, {"cn=smime-users,ou=groups,dc=example,dc=org", "smime-users"})
    assert not is_entitled(profile("smime-users"), set())


def test_a_directory_value_that_is_no_dn_is_ignored_not_an_error():
    assert is_entitled(profile("smime-users"), {"not a dn", "cn=smime-users,ou=groups,dc=example,dc=org"})


def test_a_malformed_group_in_a_profile_is_a_configuration_error_naming_the_profile():
    with pytest.raises(ConfigError, match="profile 'p': group 'cn=x,,dc=y' is not a distinguished name"):
        profile("cn=x,,dc=y")
    with pytest.raises(ConfigError, match="profile 'p'.*groups must be a list"):
        parse_profiles({"p": {"usage": "encryption", "groups": "cn=smime-users,ou=groups,dc=example,dc=org"}})
    with pytest.raises(ConfigError, match="profile 'q'.*not a distinguished name"):
        resolve_profile_groups(parse_profiles({"q": {"usage": "signature", "groups": ["staff"]}}), "not a base")
