"""The in-memory directory of the RA's unit tests (tests/ra/fakes.py) behaves as LdapDirectory against the
session's real slapd: the same expectations, run on both. What it does not show, the RA's tests cannot
lean on."""

from __future__ import annotations

import uuid

import pytest

from registration_app.core.dn import dn_key
from registration_app.core.errors import AmbiguousUser
from registration_app.core.model import Wanted
from tests.directory_sync.certs import cert
from tests.ldap_admin import MODIFY_ADD, MODIFY_DELETE
from tests.ra.fakes import InMemoryDirectory

GROUPS = "ou=groups,dc=example,dc=org"
PEOPLE = "ou=people,dc=example,dc=org"
SMIME = f"cn=smime-users,{GROUPS}"


class OnSlapd:
    """Arranges entries in the session's slapd as its administrator."""

    def __init__(self, directory, ldap_admin):
        self.directory, self.admin = directory, ldap_admin

    def user(self, email: str, groups: tuple[str, ...] = ()) -> str:
        dn = f"uid=c{uuid.uuid4().hex[:12]},{PEOPLE}"
        assert self.admin.add(dn, ["inetOrgPerson", "pkiUser"], {"cn": "C", "sn": "C", "mail": email}), \
            self.admin.result
        for group in groups:
            assert self.admin.modify(group, {"member": [(MODIFY_ADD, [dn])]}), self.admin.result
        return dn

    def leave(self, group: str, dn: str) -> None:
        assert self.admin.modify(group, {"member": [(MODIFY_DELETE, [dn])]}), self.admin.result

    def foreign_value(self, dn: str, der: bytes) -> None:
        assert self.admin.modify(dn, {"userCertificate;binary": [(MODIFY_ADD, [der])]}), self.admin.result


class InMemory:
    def __init__(self):
        self.directory = InMemoryDirectory()

    def user(self, email: str, groups: tuple[str, ...] = ()) -> str:
        return self.directory.add_user(f"uid=c{uuid.uuid4().hex[:12]},{PEOPLE}", email, groups=groups)

    def leave(self, group: str, dn: str) -> None:
        self.directory.remove_member(group, dn)

    def foreign_value(self, dn: str, der: bytes) -> None:
        self.directory.entries[dn_key(dn)].certificates.append(der)


@pytest.fixture(params=["slapd", "in-memory"])
def where(request):
    if request.param == "in-memory":
        return InMemory()
    return OnSlapd(request.getfixturevalue("directory"), request.getfixturevalue("ldap_admin"))


def address() -> str:
    return f"c{uuid.uuid4().hex[:12]}@example.org"


def test_an_address_finds_its_one_entry_whatever_its_case_and_several_are_refused(where):
    email = address()
    dn = where.user(email, (SMIME,))
    where.directory.check_bind()  # the service account binds (/health)
    assert where.directory.find_user(address()) is None
    found = where.directory.find_user(email.upper())
    assert (dn_key(found.dn), found.email, found.certificates) == (dn_key(dn), email, ())
    assert found.entry_id and found.version
    assert dn_key(SMIME) in where.directory.groups_of(found)

    where.user(email)  # a second entry with the same mail
    with pytest.raises(AmbiguousUser):
        where.directory.find_user(email)


def test_groups_are_read_live(where):
    email = address()
    dn = where.user(email, (SMIME,))
    where.leave(SMIME, dn)
    assert dn_key(SMIME) not in where.directory.groups_of(where.directory.find_user(email))


def test_publication_orders_our_values_and_leaves_other_issuers_values_alone(where):
    email = address()
    dn = where.user(email)
    foreign = cert("Partner CA", email, encryption=True)
    where.foreign_value(dn, foreign)
    old, signing, new = (cert("Our CA", email, encryption=True, age_days=9), cert("Our CA", email, encryption=False),
                         cert("Our CA", email, encryption=True))

    where.directory.publish(dn, Wanted(first=(old,), last=(signing,)))
    assert where.directory.find_user(email).certificates == (old, foreign, signing)
    where.directory.publish(dn, Wanted(first=(new,), last=(signing,), remove=frozenset({old})))
    assert where.directory.find_user(email).certificates == (new, foreign, signing)
    where.directory.publish(where.directory.find_user(email), Wanted(first=(new,), last=(signing,)))  # idempotent
    assert where.directory.find_user(email).certificates == (new, foreign, signing)
    assert where.directory.attribute_values(dn, "userCertificate;binary") == [new, foreign, signing]
