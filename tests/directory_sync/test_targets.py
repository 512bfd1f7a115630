"""Several publication targets ([targets.NAME]) against real slapds: the primary directory and an
address book, each with its own attribute map and its own state of the outbox rows. One that is down
holds back neither the other nor anything for itself: after it comes back, each has every value,
exactly once."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bench.platform import eventually
from directory_sync.config import AttributeMap
from directory_sync.slapd import PrivateSlapd
from registration_app.ra.operators import directory_status
from tests.directory_sync.world import add_group, issue, make_services, profiles_for
from tests.ldap_admin import LdapAdmin

# The address book keeps certificates in another attribute: each target writes with its own map.
BOOK_MAP = dataclasses.replace(AttributeMap.openldap(), certificate="userSMIMECertificate")
LATER = timedelta(minutes=10)  # past any back-off


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """(primary, book): two private slapds, each with the demo entries; each test may stop either."""
    primary = PrivateSlapd(tmp_path_factory.mktemp("primary"))
    book = PrivateSlapd(tmp_path_factory.mktemp("book"))
    for instance in (primary, book):
        instance.start()
        instance.load_demo()
    yield primary, book
    primary.stop()
    book.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, directories):
    primary, book = directories
    with LdapAdmin.for_slapd(primary) as admin:
        group = add_group(admin, "targets-" + uuid.uuid4().hex[:6], ["cn=admin,dc=example,dc=org"])
    services = make_services(tmp_path_factory.mktemp("targets"), primary.settings(), profiles=profiles_for(group),
                             targets={"book": book.settings(attributes=BOOK_MAP)})
    yield services, group
    services.close()


@pytest.fixture
def running(directories):
    yield directories
    for instance in directories:
        if instance.pid is None:
            instance.start()


def new_person(directories, group: str) -> tuple[str, str]:
    """The same person in both directories (by mail), entitled in the primary."""
    uid = "tg-" + uuid.uuid4().hex[:10]
    dn, email = f"uid={uid},ou=people,dc=example,dc=org", f"{uid}@example.org"
    for instance in directories:
        with LdapAdmin.for_slapd(instance) as admin:
            assert admin.add(dn, ["inetOrgPerson", "pkiUser"], {"uid": uid, "cn": uid, "sn": "T", "mail": email})
    with LdapAdmin.for_slapd(directories[0]) as admin:
        assert admin.modify(group, {"member": [("MODIFY_ADD", [dn])]}), admin.result
    return dn, email


def values(instance, dn: str, attribute: str) -> list[bytes]:
    with LdapAdmin.for_slapd(instance) as admin:
        return admin.values(dn, attribute)


def test_a_target_that_is_down_holds_back_nothing_and_catches_up_exactly_once(world, running):
    services, group = world
    primary, book = running
    target = services.publisher.targets[0]
    dn, email = new_person(running, group)
    book.stop()
    first = issue(services, email).certificate.public_bytes(Encoding.DER)
    assert services.publisher.drain(user_dn=dn) == 1
    assert values(primary, dn, "userCertificate;binary") == [first]  # at once, whatever the book does
    assert services.publisher.drain_targets() == 0
    status = directory_status(services.db, targets=["book"])["targets"]["book"]
    assert status["depth"] >= 1 and status["failing"] >= 1

    book.start()
    second = issue(services, email, profile="smime-signature").certificate.public_bytes(Encoding.DER)  # meanwhile
    assert services.publisher.drain(user_dn=dn) == 1
    assert target.drain(now=datetime.now(timezone.utc) + LATER) >= 2  # both rows, in order
    assert values(book, dn, "userSMIMECertificate") == [first, second]  # the book's own attribute, each once
    assert values(book, dn, "userCertificate;binary") == []
    assert values(primary, dn, "userCertificate;binary") == [first, second]
    assert target.drain(now=datetime.now(timezone.utc) + LATER) == 0  # nothing due any more
    assert directory_status(services.db, targets=["book"])["targets"]["book"]["depth"] == 0


def test_the_primary_down_does_not_hold_back_the_target(world, running):
    services, group = world
    primary, book = running
    dn, email = new_person(running, group)
    issued = issue(services, email).certificate.public_bytes(Encoding.DER)
    primary.stop()
    assert services.publisher.drain(user_dn=dn) == 0  # the primary's row backs off
    assert services.publisher.drain_targets() >= 1
    assert values(book, dn, "userSMIMECertificate") == [issued]
    primary.start()
    assert services.publisher.drain(user_dn=dn, now=datetime.now(timezone.utc) + LATER) == 1
    assert values(primary, dn, "userCertificate;binary") == [issued]
    assert values(book, dn, "userSMIMECertificate") == [issued]


def test_a_person_missing_from_the_target_is_done_there_not_retried(world, running):
    services, group = world
    primary, _ = running
    uid = "only-" + uuid.uuid4().hex[:8]
    dn, email = f"uid={uid},ou=people,dc=example,dc=org", f"{uid}@example.org"
    with LdapAdmin.for_slapd(primary) as admin:
        assert admin.add(dn, ["inetOrgPerson"], {"uid": uid, "cn": uid, "sn": "O", "mail": email})
        assert admin.modify(group, {"member": [("MODIFY_ADD", [dn])]})
    issue(services, email)
    services.publisher.drain(user_dn=dn)
    target = services.publisher.targets[0]
    assert target.drain() >= 1
    assert target.drain(now=datetime.now(timezone.utc) + LATER) == 0


def test_targets_are_read_from_their_own_tables_with_their_own_attribute_map(tmp_path):
    from registration_app.settings import effective_configuration, load_settings
    config = tmp_path / "autoenroll.toml"
    config.write_text('''
[targets.book]
url = "ldaps://book.corp.example.org"
bind_dn = "cn=publisher,dc=book"
password = "book-secret"

[targets.book.attributes]
certificate = "userSMIMECertificate"
''')
    settings = load_settings(config, environ={})
    book = settings.targets["book"]
    assert book.url == "ldaps://book.corp.example.org" and book.attributes.certificate == "userSMIMECertificate"
    assert settings.ldap.attributes.certificate == "userCertificate;binary"  # the primary keeps its own
    shown = effective_configuration(settings)["targets"]["book"]
    assert shown["password"] == "********" and shown["attributes"]["certificate"] == "userSMIMECertificate"


def test_a_target_takes_a_preset_of_its_own(tmp_path):
    from registration_app.core.errors import ConfigError
    from registration_app.settings import load_settings
    config = tmp_path / "autoenroll.toml"
    config.write_text('''
[targets.outlook]
preset = "ad"
url = "ldaps://dc1.corp.example.org"
base_dn = "DC=corp,DC=example,DC=org"
''')
    settings = load_settings(config, environ={})
    outlook = settings.targets["outlook"]
    assert outlook.attributes.certificate == "userCertificate" and outlook.entry_id_attribute == "objectGUID"
    assert outlook.base_dn == "DC=corp,DC=example,DC=org"
    assert settings.ldap.attributes.certificate == "userCertificate;binary"  # the primary keeps its own
    config.write_text('[targets.book]\npreset = "novell"\n')
    with pytest.raises(ConfigError, match="targets.book.preset: unknown LDAP preset 'novell'"):
        load_settings(config, environ={})


def test_environment_variables_override_a_targets_keys_and_can_add_a_target(tmp_path):
    from registration_app.settings import load_settings
    config = tmp_path / "autoenroll.toml"
    config.write_text('[targets.address-book]\nurl = "ldaps://book.corp.example.org"\n'
                      'bind_dn = "cn=publisher,dc=book"\npassword_file = "/etc/autoenroll/book.pass"\n'
                      '[targets.address-book.attributes]\ncertificate = "userSMIMECertificate"\n')
    settings = load_settings(config, environ={
        "AUTOENROLL_TARGETS__ADDRESS_BOOK__URL": "ldaps://book2.corp.example.org ldaps://book3.corp.example.org",
        "AUTOENROLL_TARGETS__ADDRESS_BOOK__TIMEOUT_SECONDS": "2.5",
        "AUTOENROLL_TARGETS__ADDRESS_BOOK__ALSO_FIND_BY": "userPrincipalName",
        "AUTOENROLL_TARGETS__OUTLOOK__PRESET": "ad",
        "AUTOENROLL_TARGETS__OUTLOOK__URL": "ldaps://dc1.corp.example.org",
        "AUTOENROLL_TARGETS__OUTLOOK__START_TLS": "false",
        "AUTOENROLL_TARGETS__OUTLOOK__ATTRIBUTES__CERTIFICATE": "userSMIMECertificate",
    })
    assert set(settings.targets) == {"address-book", "outlook"}
    book = settings.targets["address-book"]
    assert book.url == "ldaps://book2.corp.example.org ldaps://book3.corp.example.org" and book.timeout_seconds == 2.5
    assert book.also_find_by == frozenset({"userPrincipalName"})
    assert book.bind_dn == "cn=publisher,dc=book" and book.password_file == "/etc/autoenroll/book.pass"  # the file's
    assert book.attributes.certificate == "userSMIMECertificate"
    outlook = settings.targets["outlook"]
    assert outlook.preset == "ad" and outlook.entry_id_attribute == "objectGUID"  # the preset's defaults
    assert outlook.url == "ldaps://dc1.corp.example.org" and outlook.start_tls is False
    assert outlook.attributes.certificate == "userSMIMECertificate" and outlook.attributes.version == "uSNChanged"
    assert settings.ldap.url == "ldap://127.0.0.1:3890"  # [ldap] untouched


def test_a_target_can_come_from_the_environment_alone_and_a_wrong_variable_is_named():
    from registration_app.core.errors import ConfigError
    from registration_app.settings import load_settings
    settings = load_settings(None, environ={"AUTOENROLL_TARGETS__BOOK__URL": "ldaps://book.corp.example.org"})
    assert settings.targets["book"].url == "ldaps://book.corp.example.org"
    for environ, message in (
            ({"AUTOENROLL_TARGETS__BOOK__COLOUR": "red"}, "unknown setting AUTOENROLL_TARGETS__BOOK__COLOUR"),
            ({"AUTOENROLL_TARGETS__BOOK__TIMEOUT_SECONDS": "soon"}, "AUTOENROLL_TARGETS__BOOK__TIMEOUT_SECONDS"),
            ({"AUTOENROLL_TARGETS__BOOK__PRESET": "novell"},
             "AUTOENROLL_TARGETS__BOOK__PRESET: unknown LDAP preset 'novell'"),
            ({"AUTOENROLL_TARGETS__BOOK": "x"}, "AUTOENROLL_TARGETS__BOOK names no key of the target"),
            ({"AUTOENROLL_TARGETS": "x"}, "AUTOENROLL_TARGETS is not a setting")):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, environ=environ)


def reconciler(services):
    from directory_sync.reconcile import Reconciler
    return Reconciler(services.db, services.directory, services.ca, services.publisher, services.settings.profiles)


def test_a_full_reconcile_repairs_the_target_with_its_own_map_and_leaves_entries_in_line_unwritten(world, running):
    from tests.e2e.test_gpgsm import foreign_signing_certificate
    services, group = world
    primary, book = running
    target = services.publisher.targets[0]
    dn, email = new_person(running, group)
    encryption = issue(services, email).certificate.public_bytes(Encoding.DER)
    signature = issue(services, email, profile="smime-signature").certificate.public_bytes(Encoding.DER)
    services.publisher.drain(user_dn=dn)
    target.drain(now=datetime.now(timezone.utc) + LATER)
    assert values(book, dn, "userSMIMECertificate") == [encryption, signature]
    foreign = foreign_signing_certificate(email)
    with LdapAdmin.for_slapd(book) as admin:  # by hand in the book: ours deleted, a partner's added
        assert admin.modify(dn, {"userSMIMECertificate": [("MODIFY_REPLACE", [signature, foreign])]}), admin.result

    dry = reconciler(services).run(dry_run=True)
    assert ("book", dn) in dry.targets_republished and f"  would republish {dn} in target book" in dry.lines() \
        and values(book, dn, "userSMIMECertificate") == [signature, foreign]
    report = reconciler(services).run()
    assert ("book", dn) in report.targets_republished and report.errors == [], report.lines()
    assert values(book, dn, "userSMIMECertificate") == [encryption, foreign, signature]  # each once, ours first
    assert values(book, dn, "userCertificate;binary") == []  # the book's own attribute only
    assert values(primary, dn, "userCertificate;binary") == [encryption, signature]  # the primary as it was
    again = reconciler(services).run()
    assert again.targets_republished == [] and dn not in again.republished, again.lines()

    # The person leaves the group: the pass revokes and takes our values off the book too, at once;
    # the revocations' outbox rows then change nothing there (no second modify: the entryCSN stays).
    with LdapAdmin.for_slapd(primary) as admin:
        assert admin.modify(group, {"member": [("MODIFY_DELETE", [dn])]}), admin.result
    left = reconciler(services).run()
    assert {r.why for r in left.revoked if r.email == email} == {"not entitled"} and ("book", dn) in left.targets_republished
    assert values(book, dn, "userSMIMECertificate") == [foreign]
    assert values(primary, dn, "userCertificate;binary") == []
    stamp = values(book, dn, "entryCSN")
    target.drain(now=datetime.now(timezone.utc) + LATER)
    assert values(book, dn, "entryCSN") == stamp and values(book, dn, "userSMIMECertificate") == [foreign]
    assert target.status()["depth"] == 0


def test_a_target_that_is_down_during_reconcile_is_an_error_of_the_report_and_the_primary_is_repaired(world, running):
    services, group = world
    primary, book = running
    dn, email = new_person(running, group)
    issued = issue(services, email).certificate.public_bytes(Encoding.DER)
    services.publisher.drain(user_dn=dn)
    with LdapAdmin.for_slapd(primary) as admin:
        assert admin.modify(dn, {"userCertificate;binary": [("MODIFY_DELETE", [issued])]}), admin.result
    book.stop()
    report = reconciler(services).run()
    assert dn in report.republished and values(primary, dn, "userCertificate;binary") == [issued]
    assert [where for where, _ in report.errors] == ["target book"], report.lines()


def test_a_revocation_leaves_a_target_whose_attribute_has_no_equality_rule(world, running):
    """userSMIMECertificate has no equality matching rule: slapd refuses deleting one of its values
    (inappropriate matching), so the target replaces the attribute whole, other issuers' values kept."""
    from cryptography import x509

    from tests.e2e.test_gpgsm import foreign_signing_certificate
    services, group = world
    _, book = running
    target = services.publisher.targets[0]
    dn, email = new_person(running, group)
    foreign = foreign_signing_certificate(email)
    with LdapAdmin.for_slapd(book) as admin:
        assert admin.modify(dn, {"userSMIMECertificate": [("MODIFY_ADD", [foreign])]}), admin.result
    issued = issue(services, email)
    der = issued.certificate.public_bytes(Encoding.DER)
    target.drain(now=datetime.now(timezone.utc) + LATER)
    assert values(book, dn, "userSMIMECertificate") == [der, foreign]
    assert services.ca.revoke(issued.serial, x509.ReasonFlags.key_compromise)
    assert target.drain(now=datetime.now(timezone.utc) + LATER) >= 1
    assert values(book, dn, "userSMIMECertificate") == [foreign]
    assert target.status()["failing"] == 0


def test_the_worker_thread_catches_a_stopped_target_up_by_itself(world, running):
    services, group = world
    _, book = running
    dn, email = new_person(running, group)
    book.stop()
    issued = issue(services, email).certificate.public_bytes(Encoding.DER)
    thread, stop = services.publisher.start_thread(interval=0.1)
    try:
        eventually(lambda: not services.publisher.pending(dn), timeout=30, what="the primary's publication")
        assert services.publisher.targets[0].status()["failing"] >= 1  # tried while the book was down
        book.start()
        eventually(lambda: values(book, dn, "userSMIMECertificate") == [issued], timeout=60,
                   what="the book to catch up after its back-off")
    finally:
        stop.set()
        thread.join(timeout=5)


def test_a_target_with_unsafe_settings_stops_the_server_naming_the_target():
    from directory_sync.config import LdapSettings
    from registration_app.core.errors import ConfigError
    from registration_app.wiring import check_directory
    from registration_app.settings import Settings
    settings = dataclasses.replace(Settings(), targets={
        "book": LdapSettings(url="ldap://book.corp.example.org", password="s3rvice")})
    with pytest.raises(ConfigError, match="publication target 'book': refusing a simple bind in plaintext"):
        check_directory(settings)
