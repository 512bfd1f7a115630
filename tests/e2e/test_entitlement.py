"""One entitlement rule at every step, over the real server with the built-in (demo) profiles:
invite, bootstrap, enroll, reconcile; recovery officers keep and renew their signature certificates;
a user holds one current encryption certificate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from registration_app.store.models import Certificate, EnrollmentCode, Escrow
from bench.platform import SUITE_SETTINGS, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates
from tests.ldap_admin import MODIFY_ADD, MODIFY_DELETE

ROOT = Path(__file__).resolve().parents[2]
SMIME_USERS = "cn=smime-users,ou=groups,dc=example,dc=org"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, slapd):
    """A server of its own (its reconcile passes must not revoke what other modules' tests hold),
    configured with nothing but the built-in profiles."""
    with make_platform(tmp_path_factory.mktemp("entitlement"), slapd.url, **SUITE_SETTINGS).running() as p:
        yield p


def certificates(platform, email: str, **where) -> list[Certificate]:
    with platform.transaction() as session:
        query = select(Certificate).where(func.lower(Certificate.email) == email.lower())
        for name, value in where.items():
            query = query.where(getattr(Certificate, name) == value)
        return list(session.execute(query).scalars())


def codes_of(platform, email: str) -> list[EnrollmentCode]:
    with platform.transaction() as session:
        return list(session.execute(select(EnrollmentCode).where(EnrollmentCode.email == email)).scalars())


def refusal_of_invite(platform, email: str) -> str:
    result = platform.autoenroll("invite", email, check=False)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    return lines[0]


def test_bob_is_refused_at_invite_as_the_readme_and_make_run_say(demo):
    email = "bob@example.org"
    before = ldap_certificates(demo, email)
    line = refusal_of_invite(demo, email)
    assert line == ("Error: bob@example.org is not a member of a group entitled to profile 'smime-signature' "
                    "(entitled groups: cn=recovery-officers,ou=groups,dc=example,dc=org, "
                    "cn=smime-users,ou=groups,dc=example,dc=org)")
    assert codes_of(demo, email) == [] and certificates(demo, email) == []
    assert ldap_certificates(demo, email) == before
    # What the README shows and what `make run` prints are what bob sees.
    assert line in (ROOT / "README.md").read_text()
    hint = re.search(r'\\"(bob@example\.org is not [^"\\]*?) \.\.\.\\"', (ROOT / "Makefile").read_text())
    assert hint is not None and hint.group(1) in line, hint


def test_a_lookalike_group_elsewhere_in_the_tree_entitles_nobody(demo, ldap_admin, new_user):
    dn, email = new_user()
    holder_dn, holder = new_user(groups=("smime-users",))
    invite_and_bootstrap(demo, holder)  # entitled then; later only in the lookalike group
    assert ldap_admin.modify(SMIME_USERS, {"member": [(MODIFY_DELETE, [holder_dn])]})
    lookalike = "cn=smime-users,ou=people,dc=example,dc=org"  # where a user with write access could make one
    assert ldap_admin.add(lookalike, ["groupOfNames"], {"cn": "smime-users", "member": [dn, holder_dn]}), \
        ldap_admin.result
    try:
        assert "not a member of a group entitled to profile 'smime-signature'" in refusal_of_invite(demo, email)
        assert codes_of(demo, email) == []
        refused = demo.agent("enroll", "--email", holder, check=False)
        assert refused.returncode == 1 and "not_entitled" in refused.stderr
        assert certificates(demo, holder, usage="encryption") == []
    finally:
        assert ldap_admin.delete(lookalike)


def test_bootstrap_checks_again_and_enroll_and_reconcile_apply_the_same_rule(demo, ldap_admin, new_user):
    dn, email = new_user(groups=("smime-users",))
    code = demo.autoenroll("invite", email).stdout.strip()
    assert ldap_admin.modify(SMIME_USERS, {"member": [(MODIFY_DELETE, [dn])]})  # left before using the code
    refused = demo.agent("bootstrap", "--email", email, "--code", code, check=False)
    assert refused.returncode == 1 and "not_entitled" in refused.stderr and "smime-signature" in refused.stderr
    assert certificates(demo, email) == [] and ldap_certificates(demo, email) == []
    assert [c.used_at for c in codes_of(demo, email)] == [None]  # refused, not burnt

    assert ldap_admin.modify(SMIME_USERS, {"member": [(MODIFY_ADD, [dn])]})  # back: the same code works
    assert "signature certificate for" in demo.agent("bootstrap", "--email", email, "--code", code).stdout
    (signature,) = certificates(demo, email, status="valid")

    assert ldap_admin.modify(SMIME_USERS, {"member": [(MODIFY_DELETE, [dn])]})
    result = demo.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    assert result.returncode == 1 and "not_entitled" in result.stderr and "smime-encryption" in result.stderr
    assert certificates(demo, email, usage="encryption") == []
    with demo.transaction() as session:
        assert session.execute(select(func.count()).select_from(Escrow).where(Escrow.email == email)).scalar_one() == 0

    out = demo.autoenroll("sync", "reconcile").stdout
    assert f"revoke {signature.serial} (smime-signature) of {email}: not entitled" in out
    assert [c.status for c in certificates(demo, email)] == ["revoked"]
    assert ldap_certificates(demo, email) == []


def test_recovery_officers_keep_their_signature_certificates_through_reconcile_and_renew(demo, new_user):
    officers = [new_user(groups=("recovery-officers",))[1] for _ in range(2)]
    for email in officers:
        invite_and_bootstrap(demo, email)
    dry = demo.autoenroll("sync", "reconcile", "--dry-run").stdout
    assert not any(email in dry for email in officers), dry
    demo.autoenroll("sync", "reconcile")
    for email in officers:
        (current,) = certificates(demo, email, status="valid")
        assert current.profile == "smime-signature"
        assert ldap_certificates(demo, email) == [current.der]
    out = demo.agent("renew", "--email", officers[0], "--profile", "smime-signature", "--force").stdout
    assert "renewed certificate" in out
    (renewed,) = certificates(demo, officers[0], status="valid")
    assert renewed.replaces is not None
    demo.autoenroll("sync", "reconcile")
    assert [c.serial for c in certificates(demo, officers[0], status="valid")] == [renewed.serial]


def test_one_default_encryption_profile_and_one_current_encryption_certificate_per_user(demo, new_user):
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(demo, email)
    out = demo.agent("enroll", "--email", email).stdout  # no --profile: the server's default_encryption_profile
    assert "profile smime-encryption," in out
    (rsa,) = certificates(demo, email, usage="encryption")
    assert rsa.profile == "smime-encryption"
    assert "provision smime-encryption for" in demo.autoenroll("provision", "--group", "smime-users", "--dry-run").stdout

    second = demo.agent("enroll", "--email", email, "--profile", "smime-encryption-ec", check=False)
    assert second.returncode == 1 and "conflict" in second.stderr
    assert (f"already has a current encryption certificate of profile 'smime-encryption' (serial {rsa.serial})"
            in second.stderr)
    assert [c.serial for c in certificates(demo, email, usage="encryption")] == [rsa.serial]
    # An explicit replacement for the other profile supersedes the current one, and only it is published.
    demo.agent("enroll", "--email", email, "--profile", "smime-encryption-ec", "--replace")
    (current,) = certificates(demo, email, usage="encryption", status="valid")
    assert (current.profile, current.replaces) == ("smime-encryption-ec", rsa.serial)
    assert [c.status for c in certificates(demo, email, serial=rsa.serial)] == ["superseded"]
    published = ldap_certificates(demo, email)
    assert published[0] == current.der and rsa.der not in published


def test_an_expired_encryption_certificate_of_another_profile_is_superseded_by_a_new_one(demo, new_user):
    """Expired, it is no longer current (no --replace needed), but it would hold the address's slot in the
    one-current-encryption index: the new certificate supersedes it."""
    from datetime import datetime, timedelta, timezone
    from sqlalchemy import update
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(demo, email)
    demo.agent("enroll", "--email", email, "--profile", "smime-encryption")
    (rsa,) = certificates(demo, email, usage="encryption")
    with demo.transaction() as session:  # its not_after in our records moved to yesterday
        session.execute(update(Certificate).where(Certificate.serial == rsa.serial).values(
            not_after=datetime.now(timezone.utc) - timedelta(days=1)))
    demo.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    (current,) = certificates(demo, email, usage="encryption", status="valid")
    assert (current.profile, current.replaces) == ("smime-encryption-ec", rsa.serial)
    assert [c.status for c in certificates(demo, email, serial=rsa.serial)] == ["superseded"]


def test_a_user_who_already_holds_two_encryption_certificates_can_still_renew_each(demo, new_user):
    """Issued before the one-certificate rule (or under coexist): renewals keep working, nothing new is added.
    The first certificate is made one from before migration 0009 (no encryption slot: outside the index)."""
    from sqlalchemy import update
    from registration_app.authorities.key_authority import IssueRequest
    from registration_app.wiring import build_services
    from registration_app.settings import load_settings
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(demo, email)
    demo.agent("enroll", "--email", email, "--profile", "smime-encryption-ec")
    with demo.transaction() as session:
        session.execute(update(Certificate).where(Certificate.email == email).values(encryption_slot=None))
    services = build_services(load_settings(demo.config))
    try:  # the second one straight from the key authority, past the RA's rule
        services.key_authority.issue(IssueRequest(
            user=services.directory.find_user(email), profile=services.settings.profiles["smime-encryption"],
            actor="test", password="x"))
    finally:
        services.close()
    assert "renewed certificate" in demo.agent("renew", "--email", email, "--profile", "smime-encryption-ec",
                                               "--force").stdout
    demo.agent("enroll", "--email", email, "--profile", "smime-encryption", "--replace")  # its own replacement
    current = certificates(demo, email, usage="encryption", status="valid")
    assert sorted(c.profile for c in current) == ["smime-encryption", "smime-encryption-ec"]
    assert all(c.replaces is not None for c in current)
