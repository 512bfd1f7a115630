"""Filter values and DN values escaped by python-ldap's own helpers (RFC 4515, RFC 4514)."""

from __future__ import annotations

import pytest

from directory_sync.escape import dn_value, filter_value, first_rdn
from registration_app.core.errors import BadRequest


def test_filter_values_escape_what_rfc_4515_names_and_nothing_else():
    assert filter_value("a*b(c)d\\e\x00f") == "a\\2ab\\28c\\29d\\5ce\\00f"
    assert filter_value("Élodie.O'Brien+x@example.org") == "Élodie.O'Brien+x@example.org"


def test_dn_values_escape_what_rfc_4514_names():
    assert dn_value("Smith, John+x") == "Smith\\, John\\+x"
    assert dn_value(" lead") == "\\ lead"


def test_the_first_rdn_is_read_unescaped():
    assert first_rdn("cn=Autoenroll CA,ou=services,dc=example,dc=org") == ("cn", "Autoenroll CA")
    assert first_rdn("CN=Smith\\, John,ou=people,dc=example,dc=org") == ("CN", "Smith, John")
    assert first_rdn(f"cn={dn_value('a,b=c')},dc=x") == ("cn", "a,b=c")


@pytest.mark.parametrize("dn", ["not a dn", ""])
def test_a_string_that_is_no_dn_is_a_bad_request(dn):
    with pytest.raises(BadRequest):
        first_rdn(dn)
