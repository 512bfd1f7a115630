"""The one DN normaliser (core/dn.py), checked against python-ldap's parser (libldap's ldap_str2dn)."""

from __future__ import annotations

import ldap.dn
import pytest

from registration_app.core.dn import InvalidDn, dn_key, group_dn, normalise_dn

SAME_ENTRY = [
    ("cn=smime-users,ou=groups,dc=example,dc=org", "CN=SMIME-Users, OU=Groups , DC=example,dc=org"),
    ("cn=smime-users,ou=groups,dc=example,dc=org", "cn = smime-users ; ou = groups ; dc = example ; dc = org"),
    (r"cn=Doe\, John,ou=people,dc=x", 'cn="Doe, John",ou=people,dc=x'),
    (r"cn=Doe\2C John,ou=people,dc=x", r"cn=doe\, john,ou=people,dc=x"),
    ("cn=a+sn=b,dc=x", "SN=b+CN=a,dc=x"),
    (r"cn=caf\C3\A9,dc=x", "cn=CAFÉ,dc=x"),
    ("cn=Alice  Anderson,dc=x", "cn=alice anderson,dc=x"),
    ("2.5.4.3=x,dc=y", "OID.2.5.4.3=X,dc=y"),
]
DIFFERENT_ENTRIES = [
    ("cn=smime-users,ou=groups,dc=example,dc=org", "cn=smime-users,ou=people,dc=example,dc=org"),
    ("cn=smime-users,ou=groups,dc=example,dc=org", "cn=smime-users-old,ou=groups,dc=example,dc=org"),
    ("cn=alice anderson,dc=x", "cn=aliceanderson,dc=x"),  # the former dn_key joined these two
    (r"cn=a\,ou=b,dc=x", "cn=a,ou=b,dc=x"),
    ("cn=a+sn=b,dc=x", "cn=a,sn=b,dc=x"),
]
NOT_DNS = ["", "   ", "cn", "smime-users", "dc=x,", ",dc=x", "cn=x,,dc=y", "cn=,dc=x", "cn=a<b,dc=x", "cn=x\\",
           "1cn=x", r"cn=\ff\fe,dc=x", 'cn="open,dc=x']


@pytest.mark.parametrize(("one", "other"), SAME_ENTRY)
def test_spellings_of_one_dn_normalise_alike(one, other):
    assert normalise_dn(one) == normalise_dn(other)


@pytest.mark.parametrize(("one", "other"), DIFFERENT_ENTRIES)
def test_different_entries_never_normalise_alike(one, other):
    assert normalise_dn(one) != normalise_dn(other)


@pytest.mark.parametrize("dn", [dn for pair in SAME_ENTRY + DIFFERENT_ENTRIES for dn in pair])
def test_the_normal_form_is_a_dn_libldap_reads_as_the_same_rdns(dn):
    normal = normalise_dn(dn)
    assert normalise_dn(normal) == normal
    parsed = ldap.dn.str2dn(normal)  # libldap accepts it and finds the same RDNs, values and order
    ours = [sorted((t.lower(), v.lower()) for t, v, _ in rdn) for rdn in parsed]
    reference = [sorted((t.lower().removeprefix("oid."), " ".join(v.split()).lower()) for t, v, _ in rdn)
                 for rdn in ldap.dn.str2dn(dn.replace("OID.", ""))]
    assert ours == reference


@pytest.mark.parametrize("text", NOT_DNS)
def test_what_is_not_a_dn_is_refused(text):
    with pytest.raises(InvalidDn):
        normalise_dn(text)
    assert dn_key(text) not in {normalise_dn(a) for pair in SAME_ENTRY for a in pair}


def test_a_bare_group_name_is_the_group_directly_under_groups_base():
    base = "ou=Groups,dc=example,dc=org"
    assert group_dn("smime-users", base) == "cn=smime-users,ou=groups,dc=example,dc=org"
    assert group_dn("Sales, EU", base) == r"cn=sales\, eu,ou=groups,dc=example,dc=org"
    assert group_dn("CN=X,OU=Elsewhere,dc=example,dc=org", base) == "cn=x,ou=elsewhere,dc=example,dc=org"
    with pytest.raises(InvalidDn):
        group_dn("  ", base)
