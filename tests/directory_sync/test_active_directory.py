"""LdapDirectory with the `ad` preset against a real Samba AD DC (tests/samba_dc.py), over LDAPS verified
against the certificate the test issued for it, bound as the service account that may write
userCertificate of users and nothing else."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import ldap
import pytest

from directory_sync import connection
from directory_sync.config import AttributeMap, LdapSettings
from directory_sync.ldap import LdapDirectory, address_filter, addresses
from registration_app.core.dn import dn_key
from registration_app.core.errors import DirectoryUnavailable
from registration_app.core.model import Wanted
from tests.e2e.test_gpgsm import foreign_signing_certificate
from tests.ldap_admin import MODIFY_REPLACE, LdapAdmin
from tests.samba_dc import ADMIN_PASSWORD, BASE, GROUPS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD

ALICE, BOB, DAVE = (f"CN={name},{PEOPLE}" for name in ("Alice Liddell", "Bob Builder", "Dave Lister"))
GROUP = {name: dn_key(f"CN={name},{GROUPS}") for name in ("smime-users", "engineering", "platform-team")}


@pytest.fixture(scope="module")
def inside(samba_dc):
    """This module's thread in the DC's network namespace."""
    with samba_dc.namespace.entered():
        yield samba_dc


def ad_settings(dc, **changes) -> LdapSettings:
    settings = dataclasses.replace(
        LdapSettings.for_preset("ad"), url=dc.url, ca_file=str(dc.ca_file), bind_dn=SERVICE_DN,
        password=SERVICE_PASSWORD, base_dn=BASE, users_base=PEOPLE, groups_base=GROUPS)
    return dataclasses.replace(settings, **changes)


@pytest.fixture
def directory(inside):
    d = LdapDirectory(ad_settings(inside))
    yield d
    d.close()


@pytest.fixture
def admin(inside):
    conn = LdapAdmin(inside.url, f"CN=Administrator,CN=Users,{BASE}", ADMIN_PASSWORD, ca_file=str(inside.ca_file))
    yield conn
    conn.unbind()


def test_the_ad_preset_names_what_active_directory_calls_things():
    settings = LdapSettings.for_preset("ad")
    names = settings.attributes
    assert names == AttributeMap.ad()
    assert (names.certificate, names.ca_certificate, names.crl, names.authority_crl) == (
        "userCertificate", "cACertificate", "certificateRevocationList", "authorityRevocationList")
    assert (names.version, names.modify_timestamp, names.in_chain_rule) == (
        "uSNChanged", "whenChanged", "1.2.840.113556.1.4.1941")
    assert (settings.entry_id_attribute, settings.nested_groups, settings.use_memberof) == ("objectGUID", True, True)
    assert dataclasses.replace(settings, base_dn=BASE).ca_dn == (
        f"CN=Autoenroll CA,CN=Certification Authorities,CN=Public Key Services,CN=Services,CN=Configuration,{BASE}")


def test_groups_nested_two_levels_come_from_one_search_by_the_in_chain_rule(directory):
    alice = directory.find_user("alice@autoenroll.test")
    assert alice is not None and alice.dn.lower() == ALICE.lower()
    assert len(alice.entry_id) == 36  # objectGUID, shown as AD tools show it
    assert set(GROUP.values()) <= directory.groups_of(alice)
    assert directory.is_member(alice, ["smime-users"])
    assert directory.groups_of(directory.find_user("bob@autoenroll.test")) == frozenset()
    members = directory.group_members("smime-users")
    assert dn_key(ALICE) in members and dn_key(BOB) not in members
    assert dn_key(ALICE) in {dn_key(u.dn) for u in directory.members_of_group("smime-users")}


def test_entitlement_groups_are_answered_with_the_entry_in_one_round_trip_nesting_included(inside):
    asked = [f"CN=smime-users,{GROUPS}", f"CN=sales,{GROUPS}"]
    directory = LdapDirectory(ad_settings(inside), entitlement_groups=asked)
    # The same settings at a port where nothing listens: groups_of asks the directory nothing.
    unreachable = LdapDirectory(ad_settings(inside, url="ldaps://127.0.0.1:1", timeout_seconds=0.5),
                                entitlement_groups=asked)
    try:
        alice, bob, carol = (directory.find_user(f"{name}@autoenroll.test") for name in ("alice", "bob", "carol"))
        assert directory.pool.opened == 1 and directory.pool.idle_connections == 1  # every answer read
        assert GROUP["smime-users"] in unreachable.groups_of(alice)  # two levels down
        assert GROUP["platform-team"] in unreachable.groups_of(alice)  # her own memberOf, read with the entry
        assert dn_key(f"CN=sales,{GROUPS}") not in unreachable.groups_of(alice)
        assert unreachable.is_member(carol, ["smime-users"]) and not unreachable.is_member(bob, ["smime-users", "sales"])
        assert unreachable.groups_of(bob) == frozenset() and unreachable.pool.opened == 0
        assert directory.find_user("nobody@autoenroll.test") is None
        assert directory.find_user("alice@autoenroll.test") == alice and directory.pool.opened == 1
    finally:
        directory.close()
        unreachable.close()


def test_users_are_found_by_mail_and_by_configured_proxy_addresses_or_user_principal_name(inside, admin):
    assert admin.modify(DAVE, {"proxyAddresses": [(MODIFY_REPLACE, ["SMTP:dave@autoenroll.test",
                                                                    "smtp:d.lister@autoenroll.test",
                                                                    "X400:c=US;a= ;p=Autoenroll;s=Lister"])],
                               "userPrincipalName": [(MODIFY_REPLACE, ["dl@autoenroll.test"])]}), admin.result
    by_mail = LdapDirectory(ad_settings(inside))
    by_all = LdapDirectory(ad_settings(inside, also_find_by=frozenset({"proxyAddresses", "userPrincipalName"})))
    try:
        assert by_mail.find_user("d.lister@autoenroll.test") is None
        assert by_mail.find_user("dave@autoenroll.test").dn.lower() == DAVE.lower()
        alias = by_all.find_user("D.Lister@autoenroll.test")
        assert alias is not None and alias.dn.lower() == DAVE.lower() and alias.email == "d.lister@autoenroll.test"
        assert by_all.find_user("dl@autoenroll.test").email == "dl@autoenroll.test"
        assert by_all.find_user("dave@autoenroll.test").email == "dave@autoenroll.test"
    finally:
        by_mail.close()
        by_all.close()


def test_certificates_go_into_plain_user_certificate_and_other_issuers_values_stay(directory, admin):
    foreign = foreign_signing_certificate("dave@autoenroll.test")
    ours = foreign_signing_certificate("dave@autoenroll.test")
    assert admin.modify(DAVE, {"userCertificate": [(MODIFY_REPLACE, [foreign])]}), admin.result
    directory.publish(DAVE, Wanted(first=(ours,)))
    assert admin.values(DAVE, "userCertificate") == [ours, foreign]
    assert admin.values(DAVE, "userCertificate;binary") == []  # AD knows no ;binary option
    directory.publish(DAVE, Wanted(remove=frozenset({ours})))
    assert admin.values(DAVE, "userCertificate") == [foreign]


def test_the_service_account_may_write_user_certificate_and_nothing_else(directory, admin):
    before = admin.values(ALICE, "description")
    with pytest.raises(DirectoryUnavailable, match="refused"):
        directory.pool.run(lambda conn: conn.modify_ext_s(ALICE, [(ldap.MOD_REPLACE, "description", [b"x"])]))
    with pytest.raises(DirectoryUnavailable, match="refused"):
        directory.pool.run(lambda conn: conn.modify_ext_s(f"CN=smime-users,{GROUPS}",
                                                          [(ldap.MOD_ADD, "member", [BOB.encode()])]))
    assert admin.values(ALICE, "description") == before


def test_searches_from_the_domain_root_page_and_skip_referrals(directory):
    conn = connection.bind(directory.settings)
    try:
        pages = list(connection.search_pages(conn, BASE, "(objectClass=user)", ["1.1"], timeout=10, page_size=2))
    finally:
        connection.close(conn)
    found = [dn for page in pages for dn, _ in page]
    assert len(pages) > 2 and all(dn is not None for dn in found)  # AD sends referrals to CN=Configuration...
    assert {ALICE.lower(), BOB.lower(), SERVICE_DN.lower()} <= {dn.lower() for dn in found}
    assert len(found) == len(set(found))


def test_incremental_passes_select_users_by_when_changed(directory, admin):
    assert admin.modify(BOB, {"description": [(MODIFY_REPLACE, ["touched"])]}), admin.result
    recent = {dn_key(u.dn) for u in directory.iter_users(since=datetime.now(timezone.utc) - timedelta(minutes=5))}
    assert dn_key(BOB) in recent
    assert list(directory.iter_users(since=datetime.now(timezone.utc) + timedelta(hours=1))) == []


def test_the_address_filter_asks_proxy_addresses_by_their_smtp_values_and_escapes_the_address():
    settings = LdapSettings.for_preset("ad")
    assert address_filter(settings, "a*b@x.test") == r"(mail=a\2ab@x.test)"
    settings = dataclasses.replace(settings, also_find_by=frozenset({"proxyAddresses", "userPrincipalName"}))
    assert address_filter(settings, "a(b@x.test") == (r"(|(mail=a\28b@x.test)(proxyAddresses=smtp:a\28b@x.test)"
                                                     r"(proxyAddresses=SMTP:a\28b@x.test)(userPrincipalName=a\28b@x.test))")
    attrs = {"mail": [b"a@x.test"], "proxyaddresses": [b"SMTP:a@x.test", b"smtp:alias@x.test", b"X400:c=US"],
             "userprincipalname": [b"upn@x.test"]}
    assert addresses(settings, attrs) == ["a@x.test", "a@x.test", "alias@x.test", "upn@x.test"]
