"""A certificate of another trust anchor authenticates only the directory entry that lists it (real slapd),
within the anchor's mail domains; the `[trust]` settings and user-trust.pem build those anchors."""

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from registration_app.auth.anchors import AnchorPolicy, entry_lists_certificate, require_own_ca, user_entry
from registration_app.auth.chain import UserTrust, verify_user_chain
from registration_app.core.errors import (AnchorNotAllowed, CertificateNotListed, ConfigError, OwnCaRequired,
                                          UserNotFound)
from registration_app.wiring import build_user_trust
from registration_app.settings import Settings, load_settings
from bench import pki
from tests.auth.helpers import never_revoked
from tests.external_ca import ExternalCA, dead_url


@pytest.fixture(scope="module")
def ours():
    return pki.make_ca("Our CA")


@pytest.fixture(scope="module")
def partner():
    return ExternalCA.create("Partner Root", dead_url())


def identity(ours, partner, email, **policy):
    """Who the partner's certificate for `email` says it is (revocation not checked: not what these show)."""
    user = partner.user(email)
    anchor = AnchorPolicy(name="partner", certificates=(partner.ca.cert,), revocation="none", **policy)
    trust = UserTrust(anchors=(ours.cert, partner.ca.cert), our_issuers=(ours.cert,), external=(anchor,))
    return user, verify_user_chain([user.der], trust, pki.NOW, never_revoked)


def serial_reversed(cert) -> str:
    n = cert.serial_number
    return n.to_bytes((n.bit_length() + 7) // 8, "big")[::-1].hex()


# --- which values name a certificate (pure) ------------------------------------------------------


def test_the_certificate_itself_is_listed(partner):
    user, other = partner.user("carol@example.org"), partner.user("carol@example.org")
    assert entry_lists_certificate([other.der, user.der], user.cert)
    assert not entry_lists_certificate([other.der], user.cert)
    assert not entry_lists_certificate([], user.cert)


def test_strong_ad_mappings_name_the_certificate(partner):
    user = partner.user("carol@example.org")
    ski = user.cert.extensions.get_extension_for_class(pki.x509.SubjectKeyIdentifier).value.digest.hex()
    rfc, ad = "CN=Partner Root,O=Autoenroll Test", "O=Autoenroll Test,CN=Partner Root"
    for value in (f"X509:<I>{ad}<SR>{serial_reversed(user.cert)}", f"X509:<I>{rfc}<SR>{serial_reversed(user.cert)}",
                  f"x509:<SKI>{ski.upper()}"):
        assert entry_lists_certificate([value], user.cert), value
    assert not entry_lists_certificate([f"X509:<I>{ad}<SR>{format(user.cert.serial_number, 'x')}"], user.cert)
    assert not entry_lists_certificate([f"X509:<I>O=Elsewhere,CN=Partner Root<SR>{serial_reversed(user.cert)}"],
                                       user.cert)


def test_weak_ad_mappings_never_match(partner):
    user = partner.user("carol@example.org")
    weak = ["X509:<RFC822>carol@example.org", "X509:<S>CN=carol@example.org",
            "X509:<I>O=Autoenroll Test,CN=Partner Root<S>CN=carol@example.org", "carol@example.org"]
    assert not entry_lists_certificate(weak, user.cert)


def test_an_anchor_limited_to_domains_refuses_other_addresses(ours, partner):
    with pytest.raises(AnchorNotAllowed, match="partner.example only"):
        identity(ours, partner, "ALICE@EXAMPLE.ORG", domains=frozenset({"Partner.Example"}))
    assert identity(ours, partner, "carol@PARTNER.example", domains=frozenset({"partner.example"}))[1].anchor == \
        "partner"


def test_recovery_needs_our_ca(ours, partner):
    _, external = identity(ours, partner, "carol@example.org")
    with pytest.raises(OwnCaRequired, match="recovering escrowed keys needs a signature certificate"):
        require_own_ca(external, "recovering escrowed keys")
    mine = pki.make_user_cert(ours, "alice@example.org")
    require_own_ca(verify_user_chain([mine.der], UserTrust(anchors=(ours.cert,), our_issuers=(ours.cert,)),
                                     pki.NOW, never_revoked), "recovering escrowed keys")


# --- against the directory -----------------------------------------------------------------------


def test_an_external_certificate_for_an_address_does_not_authenticate_its_entry(directory, new_user, ours, partner):
    _, email = new_user()
    _, external = identity(ours, partner, email.upper())
    with pytest.raises(CertificateNotListed, match="not listed in the userCertificate"):
        user_entry(directory, external)


def test_the_entry_that_lists_the_certificate_is_authenticated(directory, new_user, ldap_admin, ours, partner):
    dn, email = new_user()
    user, external = identity(ours, partner, email)
    assert ldap_admin.modify(dn, {"userCertificate;binary": [("MODIFY_ADD", [user.der])]}), ldap_admin.result
    assert user_entry(directory, external).dn.lower() == dn.lower()


def test_a_configured_mapping_attribute_is_read_live(directory, new_user, ldap_admin, ours, partner):
    dn, email = new_user()
    user, external = identity(ours, partner, email, match_attribute="description")
    # The certificate in userCertificate does not count when the anchor maps by another attribute.
    assert ldap_admin.modify(dn, {"userCertificate;binary": [("MODIFY_ADD", [user.der])]}), ldap_admin.result
    with pytest.raises(CertificateNotListed, match="description"):
        user_entry(directory, external)
    mapping = f"X509:<I>O=Autoenroll Test,CN=Partner Root<SR>{serial_reversed(user.cert)}"
    assert ldap_admin.modify(dn, {"description": [("MODIFY_ADD", [mapping])]}), ldap_admin.result
    assert user_entry(directory, external).dn.lower() == dn.lower()


def test_our_certificate_needs_no_listing(directory, new_user, ours):
    _, email = new_user()
    mine = pki.make_user_cert(ours, email)
    user = verify_user_chain([mine.der], UserTrust(anchors=(ours.cert,), our_issuers=(ours.cert,)), pki.NOW,
                             never_revoked)
    assert user_entry(directory, user).email == email


def test_no_entry_is_not_found(directory, ours, partner):
    _, external = identity(ours, partner, "nobody-at-all@example.org")
    with pytest.raises(UserNotFound):
        user_entry(directory, external)


# --- configuration -------------------------------------------------------------------------------


def pem(*issued) -> bytes:
    return b"".join(i.cert.public_bytes(Encoding.PEM) for i in issued)


def test_trust_tables_and_user_trust_pem_build_the_anchors(tmp_path: Path, ours):
    partner, eid, other = pki.make_ca("Partner Root"), pki.make_ca("National eID"), pki.make_ca("Legacy Partner")
    (tmp_path / "user-trust.pem").write_bytes(pem(eid, other))
    (tmp_path / "partner.pem").write_bytes(pem(partner))
    config = tmp_path / "autoenroll.toml"
    config.write_text(f"""
data_dir = "{tmp_path}"
[trust]
crl_timeout_seconds = 2.5
[trust.anchors.partner]
file = "partner.pem"
domains = ["partner.example"]
max_crl_age_seconds = 600
match_attribute = "altSecurityIdentities"
[trust.anchors.eid]
subject = "CN=National eID,O=Autoenroll Test"
revocation = "none"
""")
    settings = load_settings(config, environ={"AUTOENROLL_TRUST__ANCHORS__PARTNER__DOMAINS": "a.example,b.example"})
    trust = build_user_trust(settings, ours.cert)
    assert set(trust.anchors) == {ours.cert, partner.cert, eid.cert, other.cert}
    assert trust.our_issuers == (ours.cert,) and trust.revocation.timeout == 2.5
    by_name = {p.name: p for p in trust.external}
    assert by_name["partner"].domains == {"a.example", "b.example"}
    assert by_name["partner"].max_crl_age == timedelta(seconds=600)
    assert by_name["partner"].match_attribute == "altSecurityIdentities"
    assert by_name["eid"].revocation == "none" and by_name["eid"].certificates == (eid.cert,)
    # What no table names keeps working as before, with the safe defaults.
    legacy = trust.policy_for(other.cert)
    assert (legacy.revocation, legacy.domains, legacy.match_attribute) == ("crl", frozenset(), "userCertificate")


def test_without_any_configuration_only_our_ca_is_trusted(tmp_path: Path, ours):
    trust = build_user_trust(Settings(data_dir=tmp_path), ours.cert)
    assert trust.anchors == (ours.cert,) and trust.external == ()


@pytest.mark.parametrize("table, message", [
    ('revocation = "ocsp"\nfile = "p.pem"', 'revocation must be "crl" or "none"'),
    ('file = "p.pem"\nsubject = "CN=x"', "either file or subject"),
    ("domains = []", "either file or subject"),
    ('file = "p.pem"\nmax_crl_age_seconds = 0', "must be positive"),
    ('file = "p.pem"\nrevoke = "none"', "unknown setting trust.anchors.bad.revoke"),
])
def test_a_wrong_anchor_table_is_a_configuration_error(tmp_path: Path, table, message):
    config = tmp_path / "autoenroll.toml"
    config.write_text(f"[trust.anchors.bad]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_an_anchor_naming_a_missing_subject_or_our_ca_is_refused(tmp_path: Path, ours):
    (tmp_path / "ours.pem").write_bytes(pem(ours))
    for table, message in (('subject = "CN=Nobody"', "no certificate in user-trust.pem"),
                           ('file = "ours.pem"', "this server's own CA")):
        config = tmp_path / "autoenroll.toml"
        config.write_text(f'data_dir = "{tmp_path}"\n[trust.anchors.x]\n{table}\n')
        with pytest.raises(ConfigError, match=message):
            build_user_trust(load_settings(config, environ={}), ours.cert)
