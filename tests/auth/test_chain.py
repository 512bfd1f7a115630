from datetime import datetime, timezone

import pytest

from registration_app.auth.anchors import AnchorPolicy
from registration_app.auth.chain import UserTrust, verify_user_chain
from registration_app.core.errors import (
    CertificateExpired,
    CertificateRevoked,
    ConfigError,
    MalformedJWS,
    UntrustedChain,
)
from registration_app.web.status import status_of
from bench import pki
from tests.auth.helpers import never_revoked


@pytest.fixture(scope="module")
def root():
    return pki.make_ca("User Root")


@pytest.fixture(scope="module")
def issuing(root):
    return pki.make_intermediate(root, "User Issuing CA", path_len=0)


@pytest.fixture(scope="module")
def trust(root, issuing):
    return UserTrust(anchors=(root.cert,), our_issuers=(issuing.cert,))


def verify(chain, trust, now=pki.NOW, is_revoked=never_revoked):
    return verify_user_chain(pki.chain_der(*chain), trust, now, is_revoked)


def test_user_through_our_intermediate(root, issuing, trust):
    user = pki.make_user_cert(issuing, "Alice@Example.org")
    identity = verify([user, issuing], trust)
    assert identity.email == "Alice@Example.org"  # as written in the certificate
    assert identity.serial == user.cert.serial_number
    assert identity.certificate_der == user.der
    assert identity.not_after == user.cert.not_valid_after_utc
    assert identity.issuer_is_ours is True


def test_user_of_an_external_ca_is_not_ours(root, trust):
    external_root = pki.make_ca("National eID", key_type="rsa")
    user = pki.make_user_cert(external_root, "carol@example.org", key_type="rsa")
    unchecked = AnchorPolicy(name="eid", certificates=(external_root.cert,), revocation="none")
    both = UserTrust(anchors=(root.cert, external_root.cert), our_issuers=trust.our_issuers, external=(unchecked,))
    identity = verify([user], both)
    assert identity.issuer_is_ours is False
    assert identity.anchor == "eid"


def test_issuer_is_ours_recognises_a_reissued_ca_certificate(root, issuing):
    user = pki.make_user_cert(issuing, "alice@example.org")
    renewed = pki.make_intermediate(root, "User Issuing CA", key=issuing.key, not_after=pki.NOW + 5000 * pki.DAY)
    assert renewed.cert != issuing.cert
    trust = UserTrust(anchors=(root.cert,), our_issuers=(renewed.cert,))
    assert verify([user, issuing], trust).issuer_is_ours


def test_not_ours_when_only_the_name_matches(root, issuing):
    impostor = pki.make_intermediate(pki.make_ca("Other Root"), "User Issuing CA")  # same subject, other key
    user = pki.make_user_cert(issuing, "alice@example.org")
    unchecked = AnchorPolicy(name="root", certificates=(root.cert,), revocation="none")
    trust = UserTrust(anchors=(root.cert,), our_issuers=(impostor.cert,), external=(unchecked,))
    assert verify([user, issuing], trust).issuer_is_ours is False


def test_chain_may_include_the_root(root, issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    assert verify([user, issuing, root], trust).issuer_is_ours


def test_rsa_chain(root):
    rsa_root = pki.make_ca("RSA Root", key_type="rsa")
    user = pki.make_user_cert(rsa_root, "dave@example.org", key_type="rsa")
    identity = verify([user], UserTrust(anchors=(rsa_root.cert,), our_issuers=(rsa_root.cert,)))
    assert identity.email == "dave@example.org" and identity.issuer_is_ours
    assert identity.certificate_der == user.der


def test_naive_now_is_taken_as_utc(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    identity = verify([user, issuing], trust, now=pki.NOW.replace(tzinfo=None))
    assert identity.email == "alice@example.org" and identity.not_after.tzinfo is not None


# --- expired / not yet valid -----------------------------------------------------------------


def test_expired_user_certificate(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org", not_before=pki.NOW - 400 * pki.DAY,
                              not_after=pki.NOW - pki.DAY)
    with pytest.raises(CertificateExpired) as caught:
        verify([user, issuing], trust)
    message = caught.value.detail
    assert "expired on" in message
    assert user.cert.not_valid_after_utc.isoformat() in message
    assert "enrollment code" in message


def test_not_yet_valid_user_certificate(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org", not_before=pki.NOW + pki.DAY,
                              not_after=pki.NOW + 10 * pki.DAY)
    with pytest.raises(CertificateExpired, match="not valid before"):
        verify([user, issuing], trust)


def test_expiry_is_judged_at_now_not_wall_clock(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    with pytest.raises(CertificateExpired):
        verify([user, issuing], trust, now=pki.NOW + 400 * pki.DAY)


def test_expired_intermediate_is_untrusted(root, trust):
    old = pki.make_intermediate(root, "Old CA", not_before=pki.NOW - 900 * pki.DAY, not_after=pki.NOW - pki.DAY)
    user = pki.make_user_cert(old, "alice@example.org", not_before=pki.NOW - 2 * pki.DAY)
    with pytest.raises(UntrustedChain):
        verify([user, old], trust)


# --- chains that must not verify -------------------------------------------------------------


def test_self_signed_user_certificate(trust):
    with pytest.raises(UntrustedChain):
        verify([pki.make_self_signed_user("mallory@example.org")], trust)


def test_self_signed_certificate_that_is_its_own_anchor_is_still_not_a_ca(trust):
    mallory = pki.make_self_signed_user("mallory@example.org")
    with pytest.raises(UntrustedChain):
        verify([mallory], UserTrust(anchors=(trust.anchors[0],)))


def test_leaf_acting_as_intermediate(root, trust):
    leaf, fake_intermediate = pki.make_leaf_signed_chain(root, "mallory@example.org")
    with pytest.raises(UntrustedChain):
        verify([leaf, fake_intermediate], trust)


def test_leaf_with_ca_flag_but_no_key_cert_sign(root, trust):
    fake = pki.make_user_cert(root, "fake-ca@example.org", is_ca=True)
    leaf = pki.make_user_cert(fake, "mallory@example.org")
    with pytest.raises(UntrustedChain):
        verify([leaf, fake], trust)


def test_path_length_is_enforced(root, issuing, trust):
    below = pki.make_intermediate(issuing, "Sub CA")  # issuing has pathLen 0
    user = pki.make_user_cert(below, "alice@example.org")
    with pytest.raises(UntrustedChain):
        verify([user, below, issuing], trust)


def test_unknown_root(trust):
    stranger = pki.make_ca("Stranger Root")
    user = pki.make_user_cert(stranger, "alice@example.org")
    with pytest.raises(UntrustedChain):
        verify([user, stranger], trust)


def test_missing_intermediate(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    with pytest.raises(UntrustedChain):
        verify([user], trust)


def test_intermediate_restricted_to_tls_cannot_issue_smime(root, trust):
    tls_only = pki.make_intermediate(root, "TLS CA", eku=(pki.SERVER_AUTH,))
    user = pki.make_user_cert(tls_only, "alice@example.org")
    with pytest.raises(UntrustedChain, match="emailProtection"):
        verify([user, tls_only], trust)


# --- leaves that are not S/MIME signature certificates ---------------------------------------


@pytest.mark.parametrize("eku", [(pki.CLIENT_AUTH,), (pki.SERVER_AUTH,), None])
def test_leaf_must_have_email_protection(issuing, trust, eku):
    user = pki.make_user_cert(issuing, "alice@example.org", eku=eku)
    with pytest.raises(UntrustedChain, match="emailProtection"):
        verify([user, issuing], trust)


@pytest.mark.parametrize("key_usage", ["keyEncipherment", "keyAgreement", None])
def test_leaf_must_be_a_signature_certificate(issuing, trust, key_usage):
    user = pki.make_user_cert(issuing, "alice@example.org", key_usage=key_usage)
    with pytest.raises(UntrustedChain, match="digitalSignature"):
        verify([user, issuing], trust)


def test_leaf_without_email(issuing, trust):
    user = pki.make_user_cert(issuing, None)
    with pytest.raises(UntrustedChain, match="email"):
        verify([user, issuing], trust)


def test_leaf_with_two_emails(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org", extra_emails=("boss@example.org",))
    with pytest.raises(UntrustedChain, match="exactly one"):
        verify([user, issuing], trust)


# --- revocation ------------------------------------------------------------------------------


def test_revoked(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    asked = []

    def is_revoked(cert):
        asked.append(cert)
        return True

    with pytest.raises(CertificateRevoked) as caught:
        verify([user, issuing], trust, is_revoked=is_revoked)
    assert asked == [user.cert]
    assert "enrollment code" in caught.value.detail


def test_revocation_is_not_looked_up_for_untrusted_chains(trust):
    asked = []
    with pytest.raises(UntrustedChain):
        verify([pki.make_self_signed_user("m@example.org")], trust, is_revoked=lambda c: asked.append(c))
    assert asked == []


# --- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize("x5c", [[], [b""], [b"\x30\x03\x02\x01\x01"], [b"garbage"]])
def test_malformed_x5c(trust, x5c):
    with pytest.raises(MalformedJWS):
        verify_user_chain(x5c, trust, pki.NOW, never_revoked)


def test_malformed_intermediate(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    with pytest.raises(MalformedJWS, match=r"x5c\[1\]"):
        verify_user_chain([user.der, issuing.der[:50]], trust, pki.NOW, never_revoked)


def test_too_long_chain(issuing, trust):
    user = pki.make_user_cert(issuing, "alice@example.org")
    with pytest.raises(MalformedJWS):
        verify_user_chain([user.der] + [issuing.der] * 5, trust, pki.NOW, never_revoked)


def test_no_anchors_is_a_configuration_error():
    with pytest.raises(ConfigError):
        UserTrust(anchors=())


def test_time_is_a_parameter():
    then = datetime(2020, 3, 1, tzinfo=timezone.utc)
    old_root = pki.make_ca("Root 2019", not_before=datetime(2019, 1, 1, tzinfo=timezone.utc),
                           not_after=datetime(2029, 1, 1, tzinfo=timezone.utc))
    user = pki.make_user_cert(old_root, "alice@example.org", not_before=datetime(2020, 1, 1, tzinfo=timezone.utc),
                              not_after=datetime(2020, 6, 1, tzinfo=timezone.utc))
    trust = UserTrust(anchors=(old_root.cert,), our_issuers=(old_root.cert,))
    assert verify([user], trust, now=then).email == "alice@example.org"
    with pytest.raises(CertificateExpired):
        verify([user], trust)  # pki.NOW is after June 2020


@pytest.mark.parametrize("key_usage", ["keyEncipherment", "keyAgreement"])
def test_an_encryption_certificate_is_refused_for_its_key_usage_not_for_its_chain(issuing, trust, key_usage):
    from registration_app.core.errors import WrongKeyUsage
    user = pki.make_user_cert(issuing, "alice@example.org", key_usage=key_usage)
    with pytest.raises(WrongKeyUsage) as refused:
        verify([user, issuing], trust)
    assert refused.value.code == "wrong_key_usage" and status_of(refused.value) == 401
    assert "chain" not in refused.value.title and "key usage" in refused.value.title


# --- chains remembered between requests ------------------------------------------------------


def test_a_remembered_chain_is_checked_for_revocation_on_every_request(root, issuing):
    trust = UserTrust(anchors=(root.cert,), our_issuers=(issuing.cert,))
    user = pki.make_user_cert(issuing, "alice@example.org")
    first = verify([user, issuing], trust)
    again = verify([user, issuing], trust)
    assert again == first and len(trust.verified) == 1  # the second request found the verified chain
    asked = []
    with pytest.raises(CertificateRevoked):
        verify([user, issuing], trust, is_revoked=lambda cert: asked.append(cert.serial_number) or True)
    assert asked == [user.cert.serial_number]


def test_a_remembered_chain_expires_with_its_shortest_lived_certificate(root):
    short = pki.make_intermediate(root, "Short-lived CA", not_after=pki.NOW + 10 * pki.DAY)
    trust = UserTrust(anchors=(root.cert,), our_issuers=(short.cert,))
    user = pki.make_user_cert(short, "alice@example.org")  # valid for a year, longer than its CA
    assert verify([user, short], trust).email == "alice@example.org"
    with pytest.raises(UntrustedChain):
        verify([user, short], trust, now=pki.NOW + 20 * pki.DAY)
    with pytest.raises(CertificateExpired):
        verify([user, short], trust, now=pki.NOW + 400 * pki.DAY)


def test_another_chain_for_the_same_leaf_is_verified_on_its_own(root, issuing):
    trust = UserTrust(anchors=(root.cert,), our_issuers=(issuing.cert,))
    user = pki.make_user_cert(issuing, "alice@example.org")
    verify([user, issuing], trust)
    with pytest.raises(UntrustedChain):
        verify([user], trust)  # without its intermediate the leaf does not chain, remembered or not
