"""Reconcile: the pure decision per user, then whole passes against a real slapd."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select, update

from directory_sync.config import AttributeMap
from directory_sync.reconcile import (ADDRESS_MOVED, NOT_ENTITLED, USER_NOT_IN_LDAP, CertRow, LdapUser,
                                      Reconciler, plan_user)
from registration_app.core.model import Profile, Usage
from registration_app.store.models import Certificate, Escrow
from tests.directory_sync.certs import cert
from tests.directory_sync.world import add_group, issue, make_services, profiles_for
from tests.ldap_admin import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

NOW = datetime.now(timezone.utc)
ENC = Profile(name="enc", usage=Usage.ENCRYPTION, groups=frozenset({"cn=g,ou=groups,dc=example,dc=org"}))
SIG = Profile(name="sig", usage=Usage.SIGNATURE, groups=frozenset({"cn=g,ou=groups,dc=example,dc=org"}))
PROFILES = {"enc": ENC, "sig": SIG}

CA_CERT_ATTR, CRL_ATTR = AttributeMap.openldap().ca_certificate, AttributeMap.openldap().crl


def row(serial: str, *, profile: str = "enc", status: str = "valid", age: int = 1, dn: str = "uid=u,o=x") -> CertRow:
    issued = NOW - timedelta(days=age)
    return CertRow(serial=serial, user_dn=dn, email="u@example.org", profile=profile,
                   usage=PROFILES[profile].usage.value, status=status, der=f"der-{serial}".encode(),
                   not_before=issued, not_after=issued + timedelta(days=365), issued_at=issued)


def user(*values: bytes, entitled: bool = True) -> LdapUser:
    return LdapUser(dn="uid=u,o=x", mails=("u@example.org",), groups=frozenset({"g"} if entitled else ()),
                    certificates=values)


def entitled(u: LdapUser, _profile) -> bool:
    return "g" in u.groups


# --- the decision (pure) -------------------------------------------------------------------------------
def test_in_line_user_needs_nothing():
    enc, sig = row("1"), row("2", profile="sig")
    plan = plan_user(user(enc.der, b"foreign", sig.der), [enc, sig], profiles=PROFILES, entitled=entitled, now=NOW)
    assert plan.empty


def test_a_foreign_value_before_our_encryption_certificate_is_put_after_it():
    enc, sig = row("1"), row("2", profile="sig")
    plan = plan_user(user(b"foreign", enc.der, sig.der), [enc, sig], profiles=PROFILES, entitled=entitled, now=NOW)
    assert plan.publish.first == (enc.der,) and plan.publish.last == (sig.der,)


def test_user_who_left_the_groups_is_revoked_and_unpublished_foreign_values_kept():
    enc = row("1")
    plan = plan_user(user(b"foreign", enc.der, entitled=False), [enc], profiles=PROFILES, entitled=entitled, now=NOW)
    assert [(r.serial, r.why) for r in plan.revoke] == [("1", NOT_ENTITLED)]
    assert plan.publish.shown == () and plan.publish.remove == {enc.der}  # b"foreign" is not ours: never in either


def test_user_gone_from_ldap_is_revoked():
    plan = plan_user(None, [row("1"), row("2", status="revoked")], profiles=PROFILES, entitled=entitled, now=NOW)
    assert [(r.serial, r.why) for r in plan.revoke] == [("1", USER_NOT_IN_LDAP)]


def test_certificates_of_an_address_the_entry_no_longer_has_are_revoked_and_unpublished():
    enc, sig = row("1"), row("2", profile="sig")
    moved = LdapUser(dn="uid=u,o=x", mails=("renamed@example.org",), groups=frozenset({"g"}),
                     certificates=(enc.der, sig.der, b"foreign"))
    plan = plan_user(moved, [enc, sig], profiles=PROFILES, entitled=entitled, now=NOW)
    assert [(r.serial, r.why) for r in plan.revoke] == [("1", ADDRESS_MOVED), ("2", ADDRESS_MOVED)]
    assert plan.publish.shown == () and plan.publish.remove == {enc.der, sig.der}  # b"foreign" stays


def test_missing_current_value_is_republished_and_stale_ones_removed():
    old, new, sig = row("1", status="superseded", age=30), row("2"), row("3", profile="sig")
    expired = row("4", profile="sig", age=400)
    plan = plan_user(user(old.der, expired.der, sig.der), [old, new, sig, expired], profiles=PROFILES,
                     entitled=entitled, now=NOW)
    assert not plan.revoke
    assert plan.publish.shown == (new.der, sig.der)  # current encryption certificate first
    assert plan.publish.remove == {old.der, expired.der}


def test_wrong_order_is_fixed_and_strays_of_other_users_removed():
    enc, sig = row("1"), row("2", profile="sig")
    assert plan_user(user(sig.der, enc.der), [enc, sig], profiles=PROFILES, entitled=entitled,
                     now=NOW).publish.shown == (enc.der, sig.der)
    plan = plan_user(user(enc.der, b"someone-elses"), [enc], profiles=PROFILES, entitled=entitled, now=NOW,
                     known_ours={b"someone-elses": "uid=other,o=x"})
    assert plan.publish.shown == (enc.der,) and plan.publish.remove == {b"someone-elses"}


def test_unknown_profile_is_left_alone():
    stray = CertRow(**{**row("1").__dict__, "profile": "retired"})
    assert not plan_user(user(stray.der, entitled=False), [stray], profiles=PROFILES, entitled=entitled,
                         now=NOW).revoke


# --- whole passes against slapd ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group(slapd):
    from tests.ldap_admin import LdapAdmin
    conn = LdapAdmin.for_slapd(slapd)
    dn = add_group(conn, "rec-" + uuid.uuid4().hex[:8], ["cn=admin,dc=example,dc=org"])
    conn.unbind()
    return dn


@pytest.fixture(scope="module")
def services(tmp_path_factory, slapd, group):
    s = make_services(tmp_path_factory.mktemp("reconcile"), slapd.settings(), profiles=profiles_for(group))
    yield s
    s.close()


@pytest.fixture
def reconciler(services):
    return Reconciler(services.db, services.directory, services.ca, services.publisher, services.settings.profiles)


def enrolled(services, ldap_admin, new_user, group) -> tuple[str, str, object]:
    dn, email = new_user()
    assert ldap_admin.modify(group, {"member": [(MODIFY_ADD, [dn])]}), ldap_admin.result
    issued = issue(services, email)
    services.publisher.drain(user_dn=dn)
    return dn, email, issued


def values(ldap_admin, dn: str) -> list[bytes]:
    ldap_admin.search(dn, "(objectClass=*)", BASE, attributes=["userCertificate;binary"])
    return list(ldap_admin.response[0]["raw_attributes"].get("userCertificate;binary", []))


def status(services, serial: str) -> str:
    with services.db.transaction() as session:
        return session.get(Certificate, serial).status


def test_group_exit_revokes_unpublishes_keeps_foreign_and_dry_run_changes_nothing(
        services, reconciler, ldap_admin, new_user, group):
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    stay_dn, _, stay = enrolled(services, ldap_admin, new_user, group)
    foreign = cert("Other CA", email, encryption=True)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])]})
    ours = issued.certificate.public_bytes(Encoding.DER)
    assert values(ldap_admin, dn) == [ours, foreign]
    assert ldap_admin.modify(group, {"member": [(MODIFY_DELETE, [dn])]})

    dry = reconciler.run(dry_run=True)
    assert [r.serial for r in dry.revoked] == [issued.serial] and dry.republished == [dn]
    assert status(services, issued.serial) == "valid" and values(ldap_admin, dn) == [ours, foreign]
    assert reconciler.last_run() is None  # a dry run leaves no trace

    report = reconciler.run()
    assert [(r.serial, r.why) for r in report.revoked] == [(issued.serial, NOT_ENTITLED)]
    assert status(services, issued.serial) == "revoked" and status(services, stay.serial) == "valid"
    assert values(ldap_admin, dn) == [foreign]
    assert values(ldap_admin, stay_dn) == [stay.certificate.public_bytes(Encoding.DER)]
    ldap_admin.search(services.settings.ldap.ca_entry_dn, "(objectClass=*)", BASE, attributes=[CRL_ATTR, CA_CERT_ATTR])
    crl = x509.load_der_x509_crl(ldap_admin.response[0]["raw_attributes"][CRL_ATTR][0])
    revoked = crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.affiliation_changed
    with services.db.transaction() as session:  # escrow retention
        assert session.execute(select(Escrow).where(Escrow.serial == issued.serial)).scalar_one()
    assert not reconciler.run().changed  # converged


def test_incremental_pass_sees_group_exit_deletion_and_missing_values(
        services, reconciler, ldap_admin, new_user, group):
    reconciler.run()  # a baseline: later passes are incremental
    left_dn, _, left = enrolled(services, ldap_admin, new_user, group)
    gone_dn, _, gone = enrolled(services, ldap_admin, new_user, group)
    wiped_dn, _, wiped = enrolled(services, ldap_admin, new_user, group)
    assert ldap_admin.modify(group, {"member": [(MODIFY_DELETE, [left_dn])]})
    assert ldap_admin.delete(gone_dn)
    assert ldap_admin.modify(wiped_dn, {"userCertificate;binary": [(MODIFY_DELETE, [])]})  # someone wiped it

    report = reconciler.run(incremental=True)
    assert report.mode == "incremental"
    assert {(r.serial, r.why) for r in report.revoked} == {(left.serial, NOT_ENTITLED), (gone.serial, USER_NOT_IN_LDAP)}
    assert values(ldap_admin, left_dn) == []
    assert values(ldap_admin, wiped_dn) == [wiped.certificate.public_bytes(Encoding.DER)]
    assert status(services, wiped.serial) == "valid"


def test_renamed_entry_is_followed_not_revoked(services, reconciler, ldap_admin, new_user, group):
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    new_rdn = "uid=" + dn.split(",", 1)[0].split("=", 1)[1] + "-moved"
    assert ldap_admin.modify_dn(dn, new_rdn), ldap_admin.result
    new_dn = f"{new_rdn},ou=people,dc=example,dc=org"
    report = reconciler.run()
    assert report.moved == [(dn, new_dn)] and not report.revoked
    assert status(services, issued.serial) == "valid"
    with services.db.transaction() as session:
        assert session.get(Certificate, issued.serial).user_dn == new_dn


def entry_uuid(ldap_admin, dn: str) -> str:
    ldap_admin.search(dn, "(objectClass=*)", BASE, attributes=["entryUUID"])
    return ldap_admin.response[0]["attributes"]["entryUUID"][0]


def row_of(services, serial: str) -> Certificate:
    with services.db.transaction() as session:
        row = session.get(Certificate, serial)
        session.expunge(row)
        return row


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
def test_a_changed_mail_revokes_and_unpublishes_the_certificates_of_the_old_address(
        services, reconciler, ldap_admin, new_user, group, incremental):
    if incremental:
        reconciler.run()  # a baseline: the next pass is incremental
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    assert row_of(services, issued.serial).entry_id == entry_uuid(ldap_admin, dn)  # bound at issuance
    foreign = cert("Other CA", email, encryption=True)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [foreign])],
                                  "mail": [(MODIFY_REPLACE, ["changed-" + email])]}), ldap_admin.result

    report = reconciler.run(incremental=incremental)
    assert [(r.serial, r.why) for r in report.revoked] == [(issued.serial, ADDRESS_MOVED)]
    revoked = row_of(services, issued.serial)
    assert revoked.status == "revoked" and revoked.revocation_reason == "affiliationChanged"
    assert values(ldap_admin, dn) == [foreign]
    assert not reconciler.run().changed  # converged


def test_an_address_given_to_a_new_entry_does_not_take_the_old_certificates_along(
        services, reconciler, ldap_admin, new_user, group):
    """Before entry ids, the certificates of a deleted entry followed its address to whichever entry got it."""
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    assert ldap_admin.delete(dn)
    successor, _ = new_user()
    assert ldap_admin.modify(successor, {"mail": [(MODIFY_REPLACE, [email])]}), ldap_admin.result
    assert ldap_admin.modify(group, {"member": [(MODIFY_ADD, [successor])]}), ldap_admin.result

    report = reconciler.run()
    assert not report.moved and [(r.serial, r.why) for r in report.revoked] == [(issued.serial, USER_NOT_IN_LDAP)]
    assert row_of(services, issued.serial).user_dn == dn and values(ldap_admin, successor) == []


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
def test_an_entry_moved_to_another_ou_is_followed_by_its_entry_id(
        services, reconciler, ldap_admin, new_user, group, incremental):
    ou = "ou=moved-" + uuid.uuid4().hex[:8] + ",ou=people,dc=example,dc=org"
    assert ldap_admin.add(ou, ["organizationalUnit"], {"ou": ou.split(",")[0][3:]}), ldap_admin.result
    if incremental:
        reconciler.run()
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    rdn = dn.split(",", 1)[0]
    assert ldap_admin.modify_dn(dn, rdn + "-x", new_superior=ou), ldap_admin.result
    new_dn = f"{rdn}-x,{ou}"
    report = reconciler.run(incremental=incremental)
    assert report.moved == [(dn, new_dn)] and not report.revoked
    moved = row_of(services, issued.serial)
    assert (moved.status, moved.user_dn, moved.entry_id) == ("valid", new_dn, entry_uuid(ldap_admin, new_dn))
    assert values(ldap_admin, new_dn) == [issued.certificate.public_bytes(Encoding.DER)]


def test_a_row_older_than_entry_ids_is_bound_on_first_sight(services, reconciler, ldap_admin, new_user, group):
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    with services.db.transaction() as session:
        session.execute(update(Certificate).where(Certificate.serial == issued.serial).values(entry_id=None))
    assert not reconciler.run(dry_run=True).revoked and row_of(services, issued.serial).entry_id is None
    report = reconciler.run()
    assert not report.revoked and row_of(services, issued.serial).entry_id == entry_uuid(ldap_admin, dn)


def test_periodic_mode_runs_full_first_then_incremental_and_survives_ldap_errors():
    import threading

    from directory_sync.reconcile import run_periodically
    from registration_app.core.errors import DirectoryUnavailable

    stop, calls, lines = threading.Event(), [], []

    class Fake:
        def run(self, *, incremental):
            calls.append(incremental)
            if len(calls) == 2:
                raise DirectoryUnavailable("down")
            if len(calls) == 4:
                stop.set()
            return type("R", (), {"summary": lambda self: "ok"})()

    run_periodically(Fake(), 0.01, incremental=True, echo=lines.append, stop=stop)
    assert calls == [False, True, True, True]
    assert lines[0] == "ok" and "down" in lines[1]


@pytest.mark.parametrize("use_memberof", [True, False], ids=["memberOf", "member-lists"])
def test_a_group_of_the_same_name_elsewhere_in_the_tree_entitles_nobody(
        tmp_path_factory, slapd, ldap_admin, new_user, use_memberof):
    """Profiles name the group by its bare cn: only the group directly under groups_base counts."""
    name = "rec-bare-" + uuid.uuid4().hex[:8]
    real = add_group(ldap_admin, name, ["cn=admin,dc=example,dc=org"])
    lookalike = f"cn={name},ou=people,dc=example,dc=org"
    (member_dn, member), (intruder_dn, intruder) = new_user(), new_user()
    assert ldap_admin.modify(real, {"member": [(MODIFY_ADD, [member_dn])]}), ldap_admin.result
    assert ldap_admin.add(lookalike, ["groupOfNames"], {"cn": name, "member": [intruder_dn]}), ldap_admin.result
    services = make_services(tmp_path_factory.mktemp("reconcile-bare"), slapd.settings(use_memberof=use_memberof),
                             profiles=profiles_for(name))
    try:
        kept, lost = issue(services, member), issue(services, intruder)
        report = Reconciler(services.db, services.directory, services.ca, services.publisher,
                            services.settings.profiles).run()
        assert [(r.serial, r.why) for r in report.revoked] == [(lost.serial, NOT_ENTITLED)]
        assert status(services, kept.serial) == "valid" and status(services, lost.serial) == "revoked"
    finally:
        services.close()
        assert ldap_admin.delete(lookalike)


def test_reconcile_keeps_the_recovery_officers_signature_certificates_with_the_built_in_profiles(
        tmp_path_factory, slapd, new_user):
    services = make_services(tmp_path_factory.mktemp("reconcile-officers"), slapd.settings())  # built-in profiles
    try:
        _, officer = new_user(groups=("recovery-officers",))
        _, nobody = new_user()
        kept = issue(services, officer, profile="smime-signature")
        lost = issue(services, nobody, profile="smime-signature")
        report = Reconciler(services.db, services.directory, services.ca, services.publisher,
                            services.settings.profiles).run()
        assert [(r.serial, r.why) for r in report.revoked] == [(lost.serial, NOT_ENTITLED)]
        assert status(services, kept.serial) == "valid"
    finally:
        services.close()


def test_a_full_pass_finds_our_certificate_on_an_entry_we_never_issued_to_and_an_entry_that_lost_its_values(
        services, reconciler, ldap_admin, new_user, group):
    dn, _, issued = enrolled(services, ldap_admin, new_user, group)
    emptied_dn, _, emptied = enrolled(services, ldap_admin, new_user, group)
    bystander, _ = new_user()
    ours = issued.certificate.public_bytes(Encoding.DER)
    assert ldap_admin.modify(bystander, {"userCertificate;binary": [(MODIFY_ADD, [ours])]})
    assert ldap_admin.modify(emptied_dn, {"userCertificate;binary": [(MODIFY_REPLACE, [])]})

    report = reconciler.run()
    assert report.mode == "full" and sorted(report.republished) == sorted([bystander, emptied_dn])
    assert values(ldap_admin, bystander) == []  # found among the holders of certificates
    assert values(ldap_admin, emptied_dn) == [emptied.certificate.public_bytes(Encoding.DER)]  # read at its DN
    assert values(ldap_admin, dn) == [ours] and status(services, issued.serial) == "valid"
    assert not reconciler.run().changed


def test_a_full_pass_sees_an_address_on_two_entries_though_only_one_holds_a_certificate(
        services, reconciler, ldap_admin, new_user, group):
    dn, email, issued = enrolled(services, ldap_admin, new_user, group)
    with services.db.transaction() as session:  # a row older than entry ids: followed by its address
        session.execute(update(Certificate).where(Certificate.serial == issued.serial).values(entry_id=None))
    holder, _ = new_user()
    bare, _ = new_user()
    for other in (holder, bare):
        assert ldap_admin.modify(other, {"mail": [(MODIFY_REPLACE, [email])]}), ldap_admin.result
    assert ldap_admin.modify(holder, {"userCertificate;binary": [(MODIFY_ADD, [cert("Other CA", email, encryption=True)])]})
    assert ldap_admin.delete(dn), ldap_admin.result

    report = reconciler.run()
    assert report.mode == "full" and not report.revoked and not report.moved
    assert [why for _, why in report.skipped] == [f"{email} is on 2 entries: not guessing"]
    assert status(services, issued.serial) == "valid"
