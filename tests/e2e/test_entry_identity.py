"""Over the real server (gunicorn with TLS, slapd, the command lines): a certificate belongs to
the directory entry it was issued to (entryUUID), not to a mail address. An address that moves away from
its entry takes no certificate along: reconcile revokes and unpublishes the old address's certificates,
and the old holder's signature certificate cannot enroll for the entry that gets the address next. An
entry renamed under another DN keeps its certificates and keeps working."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select, update

from registration_app.store import audit
from registration_app.store.models import Certificate
from bench.platform import SUITE_SETTINGS, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates
from tests.ldap_admin import BASE, MODIFY_REPLACE

PEOPLE = "ou=people,dc=example,dc=org"


@pytest.fixture(scope="module")
def server(tmp_path_factory, slapd):
    """A platform of its own on the session's slapd: its reconcile passes touch only its own certificates."""
    with make_platform(tmp_path_factory.mktemp("entry-identity"), slapd.url, **SUITE_SETTINGS).running() as p:
        yield p


def enrolled(server, new_user) -> tuple[str, str]:
    """A user with a signature and an encryption certificate, both published."""
    dn, email = new_user(("smime-users",))
    invite_and_bootstrap(server, email)
    assert "published in the directory" in server.agent("enroll", "--email", email, "--profile",
                                                         "smime-encryption").stdout
    assert len(ldap_certificates(server, email)) == 2
    return dn, email


def set_mail(ldap_admin, dn: str, email: str) -> None:
    assert ldap_admin.modify(dn, {"mail": [(MODIFY_REPLACE, [email])]}), ldap_admin.result


def rows(server, **where) -> list[Certificate]:
    with server.transaction() as session:
        query = select(Certificate).where(*(getattr(Certificate, k) == v for k, v in where.items()))
        found = list(session.execute(query).scalars())
        for row in found:
            session.expunge(row)
        return found


def entry_uuid(ldap_admin, dn: str) -> str:
    ldap_admin.search(dn, "(objectClass=*)", BASE, attributes=["entryUUID"])
    return ldap_admin.response[0]["attributes"]["entryUUID"][0]


def user_certificates(ldap_admin, dn: str) -> list[bytes]:
    ldap_admin.search(dn, "(objectClass=*)", BASE, attributes=["userCertificate;binary"])
    return list(ldap_admin.response[0]["raw_attributes"].get("userCertificate;binary", []))


def certificate_count(server) -> int:
    with server.transaction() as session:
        return session.execute(select(func.count()).select_from(Certificate)).scalar_one()


def enroll_refused(server, email: str, code: str) -> None:
    out = server.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    assert out.returncode == 1 and code in out.stderr, out.stdout + out.stderr


def test_a_mail_that_moves_takes_no_certificate_along(server, new_user, ldap_admin):
    """The issue's scenario: alice's mail changes; requests for the old address get 404; reconcile revokes
    and unpublishes both certificates of the old address; the old address given to another entry, the
    old holder's signature certificate cannot enroll for it: refused, nothing issued, LDAP unchanged."""
    alice_dn, old = enrolled(server, new_user)
    assert {r.entry_id for r in rows(server, user_dn=alice_dn)} == {entry_uuid(ldap_admin, alice_dn)}
    set_mail(ldap_admin, alice_dn, "renamed-" + old)
    enroll_refused(server, old, "user_not_found")  # 404: no entry has the old address

    report = server.autoenroll("sync", "reconcile").stdout.splitlines()
    for row in rows(server, user_dn=alice_dn):  # other tests' users may be in the same pass
        assert any(f"revoke {row.serial} " in line and "address no longer on the entry" in line for line in report)
    assert {(r.status, r.revocation_reason) for r in rows(server, user_dn=alice_dn)} == {("revoked", "affiliationChanged")}
    assert user_certificates(ldap_admin, alice_dn) == []  # unpublished

    bob_dn, _ = new_user(("smime-users",))
    set_mail(ldap_admin, bob_dn, old)
    before = certificate_count(server)
    enroll_refused(server, old, "certificate_revoked")
    assert certificate_count(server) == before and rows(server, user_dn=bob_dn) == []
    assert user_certificates(ldap_admin, bob_dn) == []

    # The new holder gets certificates of their own (an enrollment code), bound to their entry.
    enrolled_bob = invite_and_bootstrap(server, old) or server.agent(
        "enroll", "--email", old, "--profile", "smime-encryption").stdout
    assert "published in the directory" in enrolled_bob
    assert {r.entry_id for r in rows(server, user_dn=bob_dn)} == {entry_uuid(ldap_admin, bob_dn)}
    assert len(user_certificates(ldap_admin, bob_dn)) == 2 and user_certificates(ldap_admin, alice_dn) == []


def test_the_old_holders_certificate_is_refused_for_the_entry_that_got_the_address(server, new_user, ldap_admin):
    """Without a reconcile in between, the request itself is refused: 403 entry_changed, audited."""
    alice_dn, old = enrolled(server, new_user)
    set_mail(ldap_admin, alice_dn, "renamed-" + old)
    bob_dn, _ = new_user(("smime-users",))
    set_mail(ldap_admin, bob_dn, old)
    before = certificate_count(server)

    enroll_refused(server, old, "entry_changed")
    for action in (["list", "--email", old], ["recover", "--email", old, "--all"]):
        out = server.agent(*action, check=False)
        assert out.returncode == 1 and "entry_changed" in out.stderr, out.stdout + out.stderr
    assert certificate_count(server) == before and rows(server, user_dn=bob_dn) == []
    assert user_certificates(ldap_admin, bob_dn) == []
    with server.transaction() as session:
        denied = [e.detail for (e,) in session.execute(select(audit.AuditEvent).where(
            audit.AuditEvent.event == "request.denied")) if e.detail.get("code") == "entry_changed"
            and bob_dn in e.detail["reason"]]
    assert len(denied) == 3

    # Until reconcile ends them, the old holder's certificates are not the new holder's to replace.
    invite_and_bootstrap(server, old)
    out = server.agent("enroll", "--email", old, "--profile", "smime-encryption", "--replace", check=False)
    assert out.returncode == 1 and "now belongs to another directory entry" in out.stderr, out.stderr
    assert {r.status for r in rows(server, user_dn=alice_dn)} == {"valid"}
    # Nor through another encryption profile (the one-current-encryption rule), replace or not.
    for replace in (["--replace"], []):
        out = server.agent("enroll", "--email", old, "--profile", "smime-encryption-ec", *replace, check=False)
        assert out.returncode == 1 and "now belongs to another directory entry" in out.stderr, out.stderr
    assert {r.status for r in rows(server, user_dn=alice_dn)} == {"valid"}
    assert [r.profile for r in rows(server, user_dn=bob_dn)] == ["smime-signature"]  # bootstrap's alone


@pytest.mark.parametrize("move", ["modrdn", "other-ou"])
def test_a_renamed_entry_keeps_its_certificates_and_keeps_working(server, new_user, ldap_admin, move):
    dn, email = enrolled(server, new_user)
    rdn = dn.split(",", 1)[0]
    if move == "modrdn":
        new_rdn, superior = rdn + "-renamed", PEOPLE
    else:
        superior = f"ou=moved-{uuid.uuid4().hex[:8]},{PEOPLE}"
        assert ldap_admin.add(superior, ["organizationalUnit"], {"ou": superior.split(",")[0][3:]}), ldap_admin.result
        new_rdn = rdn
    assert ldap_admin.modify_dn(dn, new_rdn, new_superior=superior), ldap_admin.result
    new_dn = f"{new_rdn},{superior}"

    # Requests are still accepted: a renewal of the encryption certificate, then listing and recovery.
    out = server.agent("enroll", "--email", email, "--profile", "smime-encryption", "--replace").stdout
    assert "published in the directory" in out
    listed = server.agent("list", "--email", email).stdout
    assert listed.count("smime-encryption") >= 2
    assert server.agent("recover", "--email", email, "--all").stdout.count(".p12") == 2
    mine = rows(server, entry_id=entry_uuid(ldap_admin, new_dn))
    assert len(mine) == 3 and {r.user_dn for r in mine} == {new_dn}

    report = server.autoenroll("sync", "reconcile").stdout
    assert email not in report, report  # not revoked, and nothing left to follow
    assert {r.status for r in rows(server, user_dn=new_dn)} == {"valid", "superseded"}
    assert len(ldap_certificates(server, email)) == 2  # the current encryption and signature certificates


def forget_entry_ids(server, dn: str) -> None:
    """Make the user's rows look like rows written before migration 0006."""
    with server.transaction() as session:
        session.execute(update(Certificate).where(Certificate.user_dn == dn).values(entry_id=None))


def test_certificates_older_than_entry_ids_are_bound_on_first_sight(server, new_user, ldap_admin):
    dn, email = enrolled(server, new_user)
    forget_entry_ids(server, dn)
    server.agent("list", "--email", email)  # the entry is at the rows' DN: the request binds them
    assert {r.entry_id for r in rows(server, user_dn=dn)} == {entry_uuid(ldap_admin, dn)}

    # Renamed before anything saw it, an old row cannot tell a rename from an address given to another
    # entry: refused until reconcile has followed the rename (by mail, the rule before entry ids).
    forget_entry_ids(server, dn)
    rdn = dn.split(",", 1)[0]
    assert ldap_admin.modify_dn(dn, rdn + "-renamed"), ldap_admin.result
    new_dn = f"{rdn}-renamed,{PEOPLE}"
    refused = server.agent("list", "--email", email, check=False)
    assert refused.returncode == 1 and "entry_changed" in refused.stderr
    assert f"follow renamed entry {dn} -> {new_dn}" in server.autoenroll("sync", "reconcile").stdout
    server.agent("list", "--email", email)
    assert {(r.user_dn, r.entry_id, r.status) for r in rows(server, entry_id=entry_uuid(ldap_admin, new_dn))} == \
        {(new_dn, entry_uuid(ldap_admin, new_dn), "valid")}
