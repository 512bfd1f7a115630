"""LdapDirectory against a real slapd: lookups, escaping, entitlement, publication, failures."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from directory_sync.config import AttributeMap
from directory_sync.ldap import LdapDirectory
from directory_sync.plan import Wanted
from directory_sync.slapd import free_port
from registration_app.core.dn import dn_key
from registration_app.core.errors import AmbiguousUser, BadRequest, DirectoryUnavailable, UserNotFound
from tests.directory_sync.certs import cert, crl
from tests.ldap_admin import MODIFY_ADD

SMIME = "cn=smime-users,ou=groups,dc=example,dc=org"


def certificates(directory: LdapDirectory, email: str) -> list[bytes]:
    return list(directory.find_user(email).certificates)


# --- lookups ---------------------------------------------------------------------------------------
def test_find_alice(directory):
    alice = directory.find_user("Alice@Example.org")
    assert alice.dn == "uid=alice,ou=people,dc=example,dc=org"
    assert (alice.email, alice.common_name) == ("alice@example.org", "Alice Anderson")
    assert alice.member_of == {SMIME}


def test_find_user_returns_the_entrys_stable_id_which_a_rename_keeps(directory, ldap_admin, new_user):
    dn, email = new_user()
    before = directory.find_user(email)
    ldap_admin.search(dn, "(objectClass=*)", "BASE", attributes=["entryUUID"])
    assert before.entry_id == ldap_admin.response[0]["attributes"]["entryUUID"][0]
    rdn = dn.split(",", 1)[0]
    assert ldap_admin.modify_dn(dn, rdn + "-renamed"), ldap_admin.result
    after = directory.find_user(email)
    assert after.dn != before.dn and after.entry_id == before.entry_id


def test_entry_ids_read_as_text_whatever_the_directory():
    import uuid

    from directory_sync.ldap import entry_id_text
    assert entry_id_text([b"7f3c1a52-0c5e-103f-8b2a-4d9e0c1f6a77"]) == "7f3c1a52-0c5e-103f-8b2a-4d9e0c1f6a77"
    guid = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    assert entry_id_text([guid.bytes_le]) == str(guid)  # Active Directory's binary objectGUID
    assert entry_id_text([]) == ""


def test_unknown_address_is_none(directory):
    assert directory.find_user("nobody@example.org") is None


@pytest.mark.parametrize("email", ["*@example.org", "alice@example.org)(mail=*", "x@y)(|(mail=*)",
                                   "alice@example.org\\00", "\\2a@example.org", "a*@example.org"])
def test_filter_injection_finds_nothing(directory, email):
    assert directory.find_user(email) is None


@pytest.mark.parametrize("email", ["alice@example.org\x00", "alice@example.org\n", "", "*", "no-at-sign"])
def test_impossible_addresses_are_bad_requests(directory, email):
    with pytest.raises(BadRequest):
        directory.find_user(email)


def test_two_entries_with_one_address_are_ambiguous(directory, ldap_admin):
    for uid in ("twin1", "twin2"):
        ldap_admin.add(f"uid={uid},ou=people,dc=example,dc=org", ["inetOrgPerson"],
                       {"uid": uid, "cn": uid, "sn": uid, "mail": "twin@example.org"})
    with pytest.raises(AmbiguousUser):
        directory.find_user("twin@example.org")


# --- groups ----------------------------------------------------------------------------------------
def test_alice_is_entitled_bob_is_not(directory):
    alice, bob = directory.find_user("alice@example.org"), directory.find_user("bob@example.org")
    assert directory.groups_of(alice) == {SMIME}
    assert directory.groups_of(bob) == frozenset()
    assert directory.is_member(alice, ["smime-users"])
    assert directory.is_member(alice, ["CN=SMIME-Users,ou=groups,dc=example,dc=org"])
    assert not directory.is_member(bob, ["smime-users", SMIME])
    assert not directory.is_member(alice, ["recovery-officers"])


def test_the_groups_come_with_the_entry_so_entitlement_is_one_search(slapd, directory):
    """find_user reads memberOf with the entry: groups_of then asks the directory nothing (here, a
    directory that is not there answers it), so an enrollment's entitlement is one round trip."""
    alice = directory.find_user("alice@example.org")
    unreachable = LdapDirectory(slapd.settings(url=f"ldap://127.0.0.1:{free_port()}", timeout_seconds=0.5))
    assert unreachable.groups_of(alice) == {SMIME}
    assert unreachable.is_member(alice, ["smime-users"])
    assert unreachable.pool.opened == 0


@pytest.mark.parametrize("nested", [False, True])
def test_groups_without_memberof(slapd, nested):
    directory = LdapDirectory(slapd.settings(use_memberof=False, nested_groups=nested))
    try:
        assert directory.groups_of("uid=oscar,ou=people,dc=example,dc=org") == {
            "cn=recovery-officers,ou=groups,dc=example,dc=org"}
        # Other tests add members to this shared group; the demo members must be there, bob must not.
        members = {u.email for u in directory.members_of_group("smime-users")}
        assert {"alice@example.org", "carol@example.org", "dave@example.org"} <= members
        assert "bob@example.org" not in members
    finally:
        directory.close()


def test_nested_groups(slapd, directory, ldap_admin, new_user):
    dn, _ = new_user()
    inner, outer = "cn=nest-inner,ou=groups,dc=example,dc=org", "cn=nest-outer,ou=groups,dc=example,dc=org"
    assert ldap_admin.add(inner, ["groupOfNames"], {"cn": "nest-inner", "member": [dn]})
    assert ldap_admin.add(outer, ["groupOfNames"], {"cn": "nest-outer", "member": [inner]})
    assert not directory.is_member(dn, ["nest-outer"])
    for use_memberof in (True, False):
        nested = LdapDirectory(slapd.settings(nested_groups=True, use_memberof=use_memberof))
        try:
            assert nested.is_member(dn, ["nest-outer"])
            assert [u.dn for u in nested.members_of_group(outer)] == [dn]
        finally:
            nested.close()


def test_members_of_group_pages_and_iter_users_since(directory, new_user):
    # modifyTimestamp has whole seconds: start a fresh second so that older entries fall before it.
    since = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
    time.sleep((since - datetime.now(timezone.utc)).total_seconds())
    made = {new_user(groups=("recovery-officers",))[1] for _ in range(3)}
    officers = {u.email for u in directory.members_of_group("recovery-officers")}
    assert made | {"oscar@example.org", "olivia@example.org", "otto@example.org"} <= officers
    recent = {u.email for u in directory.iter_users(since=since)}
    assert made <= recent and "bob@example.org" not in recent
    assert "bob@example.org" in {u.email for u in directory.iter_users()}


def test_paged_search_beyond_one_page(slapd, ldap_admin):
    for i in range(520):
        ldap_admin.add(f"uid=p{i},ou=people,dc=example,dc=org", ["inetOrgPerson"],
                       {"uid": f"p{i}", "cn": f"p{i}", "sn": "p", "mail": f"p{i}@paged.example.org"})
    dns = [f"uid=p{i},ou=people,dc=example,dc=org" for i in range(520)]
    assert ldap_admin.add("cn=paged,ou=groups,dc=example,dc=org", ["groupOfNames"], {"cn": "paged", "member": dns}), \
        ldap_admin.result  # more members than slapd's size limit (500) lets one search return
    directory = LdapDirectory(slapd.settings(pool_size=1))
    without_memberof = LdapDirectory(slapd.settings(use_memberof=False, nested_groups=True))
    try:
        users = [u for u in directory.iter_users() if u.email.endswith("@paged.example.org")]
        assert len(users) == 520
        assert len(list(directory.members_of_group("paged"))) == 520  # memberOf=<group>, paged
        assert directory.group_members("paged") == {dn_key(dn) for dn in dns}  # the groups' member lists
        assert len(list(without_memberof.members_of_group("paged"))) == 520  # every user with mail, paged
        stop_early = directory.iter_users()
        next(stop_early)
        stop_early.close()  # abandoning a paged search must not poison the pool
        assert directory.find_user("p7@paged.example.org") is not None
    finally:
        directory.close()
        without_memberof.close()


# --- publication -----------------------------------------------------------------------------------
def test_publish_adds_removes_idempotently_and_keeps_foreign_values_after_ours(directory, ldap_admin, new_user):
    dn, email = new_user()
    foreign = cert("Other CA", email, encryption=True)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]})
    old = cert("Autoenroll CA", email, encryption=True, age_days=30)
    user = directory.find_user(email)
    directory.publish(user, Wanted(first=(old,)))
    directory.publish(user, Wanted(first=(old,)))  # again: nothing changes, no error
    assert certificates(directory, email) == [old, foreign]  # ours first: dirmngr passes on only value 1

    new = cert("Autoenroll CA", email, encryption=True)
    for _ in range(2):
        directory.publish(user.dn, Wanted(first=(new,), remove=frozenset({old})))
        assert certificates(directory, email) == [new, foreign]
    directory.publish(user, Wanted(remove=frozenset({new, cert("Autoenroll CA", email, encryption=True)})))
    assert certificates(directory, email) == [foreign]


def test_encryption_certificates_first_signature_ones_after_the_others(directory, ldap_admin, new_user):
    dn, email = new_user()
    foreign = cert("Other CA", email, encryption=False)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]})
    signing = cert("Autoenroll CA", email, encryption=False, age_days=10)
    old_enc = cert("Autoenroll CA", email, encryption=True, age_days=20)
    directory.publish(dn, Wanted(last=(signing,)))
    assert certificates(directory, email) == [foreign, signing]  # no encryption certificate of ours yet
    directory.publish(dn, Wanted(first=(old_enc,), last=(signing,)))
    assert certificates(directory, email) == [old_enc, foreign, signing]

    new_enc = cert("Autoenroll CA", email, encryption=True)
    directory.publish(dn, Wanted(first=(new_enc, old_enc), last=(signing,)))  # old one kept (keep_superseded)
    assert certificates(directory, email) == [new_enc, old_enc, foreign, signing]

    new_signing = cert("Autoenroll CA", email, encryption=False)
    directory.publish(dn, Wanted(first=(new_enc, old_enc), last=(new_signing,), remove=frozenset({signing})))
    assert certificates(directory, email) == [new_enc, old_enc, foreign, new_signing]


def test_publish_planned_on_a_stale_entry_reads_again(directory, ldap_admin, new_user):
    """An entry read earlier in the request spares publication a read only while it is unchanged
    (entryCSN asserted with the modify); if another writer changed it meanwhile, the result is what a
    fresh read would have given: our newest encryption certificate first, nothing lost."""
    dn, email = new_user()
    stale = directory.find_user(email)
    assert stale.version  # OpenLDAP's entryCSN, read with the entry
    foreign = cert("Other CA", email, encryption=False)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]})  # after our read
    enc = cert("Autoenroll CA", email, encryption=True)
    directory.publish(stale, Wanted(first=(enc,)))  # planned on the stale entry it would add enc behind foreign
    assert certificates(directory, email) == [enc, foreign]

    fresh = directory.find_user(email)
    newer = cert("Autoenroll CA", email, encryption=True)
    directory.publish(fresh, Wanted(first=(newer,), remove=frozenset({enc})))  # unchanged since read
    assert certificates(directory, email) == [newer, foreign]
    assert directory.find_user(email).version != fresh.version


def test_foreign_values_keep_their_bytes_when_they_move(directory, ldap_admin, new_user):
    dn, email = new_user()
    foreign = [cert("Other CA", email, encryption=False), cert("Third CA", email, encryption=True)]
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, foreign)]})
    enc = cert("Autoenroll CA", email, encryption=True)
    directory.publish(dn, Wanted(first=(enc,)))
    assert certificates(directory, email) == [enc, *foreign]  # the same bytes, in the order they had


def test_publish_to_a_missing_entry(directory):
    with pytest.raises(UserNotFound):
        directory.publish("uid=gone,ou=people,dc=example,dc=org", Wanted(first=(cert("A", "g@x", encryption=True),)))


def test_publish_ca_creates_then_replaces(slapd, directory, ldap_admin):
    ldap_admin.delete(slapd.settings().ca_entry_dn)
    first = cert("Autoenroll CA", "ca@x", encryption=False)
    second = cert("Autoenroll CA", "ca@x", encryption=False)
    directory.publish_ca(first)
    revocations = crl("Autoenroll CA")
    directory.publish_ca(second, revocations)
    ldap_admin.search(slapd.settings().ca_entry_dn, "(objectClass=pkiCA)", "BASE",
                      attributes=["cACertificate;binary", "certificateRevocationList;binary"])
    raw = ldap_admin.response[0]["raw_attributes"]
    assert raw["cACertificate;binary"] == [second]
    assert raw["certificateRevocationList;binary"] == [revocations]


def test_another_directorys_attribute_names_are_configuration(slapd, ldap_admin, new_user):
    """With an attribute map of other names, publication writes and lookups read those names only."""
    names = AttributeMap(certificate="userSMIMECertificate", common_name="sn")
    settings = dataclasses.replace(slapd.settings(), bind_dn=slapd.admin_dn, password=slapd.admin_password,
                                   attributes=names)  # the service account may write only userCertificate
    dn, email = new_user()
    enc = cert("Autoenroll CA", email, encryption=True)
    directory = LdapDirectory(settings)
    try:
        directory.publish(dn, Wanted(first=(enc,)))
        user = directory.find_user(email)
    finally:
        directory.close()
    assert ldap_admin.values(dn, "userSMIMECertificate") == [enc]
    assert ldap_admin.values(dn, "userCertificate;binary") == []
    assert user.certificates == (enc,) and user.common_name == "Test"


# --- failures --------------------------------------------------------------------------------------
def test_wrong_service_password_is_directory_unavailable(slapd):
    directory = LdapDirectory(slapd.settings(password="wrong"))
    with pytest.raises(DirectoryUnavailable):
        directory.find_user("alice@example.org")


def test_killed_slapd_fails_fast_then_recovers_after_restart(slapd, directory):
    assert directory.find_user("alice@example.org") is not None  # a pooled connection now exists
    slapd.kill()
    try:
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            directory.find_user("alice@example.org")
        with pytest.raises(DirectoryUnavailable):
            list(directory.iter_users())
        assert time.monotonic() - started < 2 * slapd.settings().timeout_seconds
    finally:
        slapd.restart()
    assert directory.find_user("alice@example.org").email == "alice@example.org"


def test_restart_is_invisible_to_the_next_call(slapd, directory):
    assert directory.find_user("carol@example.org") is not None
    slapd.restart()  # pooled connection is now stale
    assert directory.find_user("carol@example.org") is not None
    slapd.restart()
    assert len(list(directory.members_of_group("smime-users"))) >= 3


def test_threads_share_one_directory(slapd):
    directory = LdapDirectory(slapd.settings(pool_size=2))
    try:
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda i: directory.find_user(f"{('alice', 'bob', 'carol')[i % 3]}@example.org"),
                                  range(120)))
        assert {u.email for u in found} == {"alice@example.org", "bob@example.org", "carol@example.org"}
        assert directory.pool.idle_connections <= 2  # the pool keeps at most pool_size idle
    finally:
        directory.close()


def test_requests_reuse_pooled_connections_instead_of_binding_each_time(slapd):
    """As many threads at once as the pool keeps (a worker's request threads and its own): once each has
    a connection, no request binds again."""
    directory = LdapDirectory(slapd.settings())
    threads = directory.settings.pool_size
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: directory.find_user("alice@example.org"), range(threads * 10)))
            opened = directory.pool.opened
            list(pool.map(lambda i: directory.find_user("bob@example.org"), range(threads * 20)))
        assert opened <= threads
        assert directory.pool.opened == opened
    finally:
        directory.close()
