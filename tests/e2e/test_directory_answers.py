"""Bad directory answers seen by an agent through the real server: a refused bind, a directory that never
answers, a users base behind a referral. Each is a 503 problem document naming what the directory did;
nothing is issued; the server never answers 500."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy import func, select

from registration_app.store.models import Certificate
from bench.platform import SUITE_SETTINGS, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap

REFERRAL = "ou=moved-away,dc=example,dc=org"
MANAGE_DSA_IT = ("2.16.840.1.113730.3.4.2", True, None)


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory, slapd):
    """A platform on the session's slapd and a user with a signature certificate (the directory worked)."""
    from tests.ldap_admin import LdapAdmin
    import uuid
    if slapd.pid is None:  # a test before may have stopped it
        slapd.start()
    admin = LdapAdmin.for_slapd(slapd)
    uid = "answers-" + uuid.uuid4().hex[:8]
    dn, email = f"uid={uid},ou=people,dc=example,dc=org", f"{uid}@example.org"
    assert admin.add(dn, ["inetOrgPerson"], {"uid": uid, "cn": uid, "sn": "A", "mail": email}), admin.result
    assert admin.modify("cn=smime-users,ou=groups,dc=example,dc=org", {"member": [("MODIFY_ADD", [dn])]})
    assert admin.add(REFERRAL, ["referral", "extensibleObject"],
                     {"ou": "moved-away", "ref": f"ldap://ldap.elsewhere.example/{REFERRAL}"}), admin.result
    platform = make_platform(tmp_path_factory.mktemp("answers"), slapd.url, **SUITE_SETTINGS)
    with platform.running():
        invite_and_bootstrap(platform, email)
    yield platform, email
    admin.delete(REFERRAL, controls=[MANAGE_DSA_IT])
    admin.unbind()


@pytest.fixture(scope="module")
def black_hole():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"ldap://127.0.0.1:{server.getsockname()[1]}"


def ldap_table(platform, **values) -> str:
    """The platform's configuration with `values` set in its [ldap] table (the file's last table)."""
    original = platform.config.read_text()
    head, _, table = original.rpartition("[ldap]\n")
    kept = [line for line in table.splitlines() if line.split("=")[0].strip() not in values]
    changed = [f'{key} = {value!r}'.replace("'", '"') if isinstance(value, str) else f"{key} = {value}"
               for key, value in values.items()]
    return head + "[ldap]\n" + "\n".join(kept + changed) + "\n"


@pytest.mark.parametrize("case", ["bind_refused", "no_answer", "referral"])
def test_a_bad_directory_answer_is_a_503_naming_it_and_nothing_is_issued(bootstrapped, black_hole, tmp_path, case):
    platform, email = bootstrapped
    wrong_password = tmp_path / "ldap.pw"
    wrong_password.write_text("not-the-service-password\n")
    wrong_password.chmod(0o600)
    values, says = {
        "bind_refused": (dict(password_file=str(wrong_password)), "refused the service account's bind"),
        "no_answer": (dict(url=black_hole, timeout_seconds=0.5), "did not answer within timeout_seconds"),
        "referral": (dict(users_base=REFERRAL), "answered with a referral to ldap://ldap.elsewhere.example/"),
    }[case]
    original = platform.config.read_text()
    platform.config.write_text(ldap_table(platform, **values))
    try:
        with platform.running():
            result = platform.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    finally:
        platform.config.write_text(original)
    assert result.returncode == 1
    assert "directory_unavailable" in result.stderr and says in result.stderr, result.stderr
    with platform.transaction() as session:
        assert session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email, Certificate.profile == "smime-encryption")).scalar_one() == 0
    assert " 500 " not in platform.log.read_text() and "Traceback" not in platform.log.read_text()
