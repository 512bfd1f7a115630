"""The attribute map: every LDAP name directory_sync uses is configuration (`[ldap.attributes]`)."""

from __future__ import annotations

import pytest

from directory_sync.config import AttributeMap, LdapSettings
from registration_app.core.errors import ConfigError
from registration_app.settings import load_settings


def test_the_default_attribute_map_is_openldaps():
    names = LdapSettings().attributes
    assert names == AttributeMap.openldap()
    assert (names.certificate, names.ca_certificate, names.crl) == (
        "userCertificate;binary", "cACertificate;binary", "certificateRevocationList;binary")
    assert (names.member_of, names.version, names.modify_timestamp, names.common_name) == (
        "memberOf", "entryCSN", "modifyTimestamp", "cn")
    assert names.ca_object_classes == {"applicationProcess", "pkiCA"}


def test_attribute_names_are_overridden_one_by_one_in_toml_and_the_environment(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[ldap.attributes]\ncertificate = "userCertificate"\nmodify_timestamp = "whenChanged"\n'
                      'ca_object_classes = ["certificationAuthority", "top"]\n')
    names = load_settings(config, environ={}).ldap.attributes
    assert (names.certificate, names.modify_timestamp) == ("userCertificate", "whenChanged")
    assert names.ca_object_classes == {"certificationAuthority", "top"}
    assert names.member_of == "memberOf" and names.crl == "certificateRevocationList;binary"  # the rest: default
    names = load_settings(config, environ={"AUTOENROLL_LDAP__ATTRIBUTES__MEMBER_OF": "isMemberOf"}).ldap.attributes
    assert (names.member_of, names.certificate) == ("isMemberOf", "userCertificate")


def test_an_unknown_attribute_name_setting_is_refused(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[ldap.attributes]\ncertificat = "userCertificate"\n')
    with pytest.raises(ConfigError, match="unknown setting ldap.attributes.certificat"):
        load_settings(config, environ={})


def test_the_ad_preset_is_chosen_in_toml_and_the_rest_of_ldap_overrides_it(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[ldap]\npreset = "ad"\nbase_dn = "DC=corp,DC=example"\nentry_id_attribute = "entryUUID"\n'
                      'also_find_by = ["proxyAddresses"]\n[ldap.attributes]\nmodify_timestamp = "modifyTimeStamp"\n')
    ldap = load_settings(config, environ={}).ldap
    assert ldap.preset == "ad" and ldap.attributes.certificate == "userCertificate" and ldap.nested_groups
    assert (ldap.entry_id_attribute, ldap.attributes.modify_timestamp) == ("entryUUID", "modifyTimeStamp")
    assert ldap.also_find_by == {"proxyAddresses"}
    assert ldap.ca_dn.startswith("CN=Autoenroll CA,CN=Certification Authorities,") and ldap.ca_dn.endswith(
        ",CN=Configuration,DC=corp,DC=example")


def test_the_preset_comes_from_the_environment_too_and_an_unknown_one_is_refused(tmp_path):
    ldap = load_settings(None, environ={"AUTOENROLL_LDAP__PRESET": "ad"}).ldap
    assert ldap.attributes == AttributeMap.ad() and ldap.entry_id_attribute == "objectGUID"
    with pytest.raises(ConfigError, match="setting ldap.preset: unknown LDAP preset 'novell'"):
        load_settings(None, environ={"AUTOENROLL_LDAP__PRESET": "novell"})
