"""The private slapd built from ldap_schema/: demo DIT, memberOf, and the ACLs mail clients rely on."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


from directory_sync.slapd import SERVICE_DN, PrivateSlapd
from tests.directory_sync.certs import cert, crl
from tests.ldap_admin import MODIFY_ADD, MODIFY_REPLACE, LdapAdmin


def ldapsearch(slapd: PrivateSlapd, flt: str, *attrs: str) -> str:
    cmd = ["ldapsearch", "-x", "-LLL", "-H", slapd.url, "-b", "dc=example,dc=org", flt, *attrs]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@contextmanager
def bind(slapd: PrivateSlapd, dn: str, password: str) -> Iterator[LdapAdmin]:
    conn = LdapAdmin(slapd.url, dn, password)
    try:
        yield conn
    finally:
        conn.unbind()


def test_demo_users_have_memberof(slapd):
    out = ldapsearch(slapd, "(memberOf=cn=smime-users,ou=groups,dc=example,dc=org)", "mail")
    assert out.count("mail:") == 0  # anonymous may not read memberOf ...
    with bind(slapd, SERVICE_DN, slapd.service_password) as conn:  # ... the service account may
        conn.search("ou=people,dc=example,dc=org", "(memberOf=cn=smime-users,ou=groups,dc=example,dc=org)",
                    attributes=["mail"])
        members = {e["attributes"]["mail"][0] for e in conn.response}
        assert {"alice@example.org", "carol@example.org", "dave@example.org"} <= members  # others add more
        assert "bob@example.org" not in members


def test_anonymous_ldapsearch_reads_certificates(slapd, ldap_admin, new_user):
    dn, email = new_user()
    der = cert("Some CA", email, encryption=True)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [der])]})
    out = ldapsearch(slapd, f"(mail={email})", "userCertificate")
    assert f"dn: {dn}" in out and "userCertificate;binary::" in out
    assert "userPassword" not in ldapsearch(slapd, f"(mail={email})", "*")


def test_anonymous_reads_the_ca_entry(slapd, directory):
    directory.publish_ca(cert("Autoenroll CA", "ca@example.org", encryption=False), crl("Autoenroll CA"))
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-H", slapd.url, "-b", slapd.settings().ca_entry_dn,
                          "-s", "base", "(objectClass=pkiCA)", "cACertificate", "certificateRevocationList"],
                         capture_output=True, text=True, check=True).stdout
    assert "cACertificate;binary::" in out and "certificateRevocationList;binary::" in out


def test_service_account_cannot_write_passwords(slapd):
    with bind(slapd, SERVICE_DN, slapd.service_password) as conn:
        assert not conn.modify("uid=bob,ou=people,dc=example,dc=org",
                               {"userPassword": [(MODIFY_REPLACE, ["owned"])]})
        assert conn.result["description"] == "insufficientAccessRights"


def test_users_cannot_write_certificates(slapd):
    with bind(slapd, "uid=alice,ou=people,dc=example,dc=org", "demo") as conn:
        der = cert("Evil CA", "alice@example.org", encryption=True)
        assert not conn.modify("uid=alice,ou=people,dc=example,dc=org",
                               {"userCertificate;binary": [(MODIFY_ADD, [der])]})
        assert conn.result["description"] == "insufficientAccessRights"


def test_root_manages_cn_config_over_ldapi(slapd):
    out = subprocess.run(["ldapsearch", "-Y", "EXTERNAL", "-LLL", "-H", slapd.ldapi_url, "-b", "cn=config",
                          "(olcOverlay=*)", "olcOverlay"], capture_output=True, text=True, check=True).stdout
    assert "memberof" in out and "refint" in out


def test_bulk_load_and_restart_keep_port_and_data(tmp_path):
    instance = PrivateSlapd(tmp_path / "bulk")
    instance.start()
    port = instance.port
    try:
        ldif = "".join(
            f"dn: uid=u{i},ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: U {i}\n"
            f"sn: U\nmail: u{i}@example.org\n\n" for i in range(1200))
        instance.bulk_load(ldif)
        instance.restart()
        assert instance.port == port
        assert ldapsearch(instance, "(mail=u1199@example.org)", "mail").count("mail:") == 1
    finally:
        instance.stop()
    assert instance.pid is None
