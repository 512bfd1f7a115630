"""Certificates of other trust anchors are checked by CRL, fetched from a real HTTP server on loopback."""

from datetime import timedelta

import pytest

from registration_app.auth.anchors import AnchorPolicy
from registration_app.auth.chain import UserTrust, verify_user_chain
from registration_app.auth.revocation import FAILURE_BACKOFF, CrlChecker
from registration_app.core.errors import CertificateRevoked, RevocationUnavailable, UntrustedChain
from registration_app.web.status import status_of
from bench import pki
from tests.auth.helpers import never_revoked
from tests.external_ca import CrlServer, ExternalCA, dead_url

HOUR = timedelta(hours=1)


@pytest.fixture
def server():
    with CrlServer() as running:
        yield running


@pytest.fixture
def partner(server):
    ca = ExternalCA.create("Partner Root", server.url("/partner.crl"))
    ca.publish(server)
    return ca


def check(checker, partner, user, now=pki.NOW, max_age=HOUR):
    return checker.is_revoked(user.cert, partner.ca.cert, max_age, now)


def test_a_certificate_not_on_the_crl_is_not_revoked_and_the_crl_is_fetched_once(server, partner):
    checker, user = CrlChecker(), partner.user("carol@partner.example")
    assert check(checker, partner, user) is False
    assert check(checker, partner, user, now=pki.NOW + timedelta(minutes=59)) is False
    assert server.fetches(partner.path) == 1


def test_a_certificate_on_the_crl_is_revoked(server, partner):
    user = partner.user("carol@partner.example")
    partner.revoke(user)
    partner.publish(server)
    assert check(CrlChecker(), partner, user) is True


def test_a_crl_older_than_the_max_age_is_fetched_again_and_a_new_revocation_counts(server, partner):
    checker, user = CrlChecker(), partner.user("carol@partner.example")
    assert check(checker, partner, user) is False
    partner.revoke(user)
    partner.publish(server)
    assert check(checker, partner, user, now=pki.NOW + HOUR - timedelta(seconds=1)) is False  # cached
    assert check(checker, partner, user, now=pki.NOW + HOUR + timedelta(seconds=1)) is True
    assert server.fetches(partner.path) == 2


def test_a_crl_past_its_next_update_is_fetched_again_within_the_max_age(server, partner):
    checker, user = CrlChecker(), partner.user("carol@partner.example")
    partner.publish(server, next_update=timedelta(minutes=10))
    check(checker, partner, user, max_age=timedelta(days=1))
    partner.publish(server, now=pki.NOW + timedelta(minutes=20))
    check(checker, partner, user, now=pki.NOW + timedelta(minutes=20), max_age=timedelta(days=1))
    assert server.fetches(partner.path) == 2


def test_a_stale_crl_is_no_answer(server, partner):
    partner.publish(server, now=pki.NOW - timedelta(days=8))  # its nextUpdate was a day ago
    with pytest.raises(RevocationUnavailable, match="stale"):
        check(CrlChecker(), partner, partner.user("carol@partner.example"))


def test_a_crl_signed_by_another_key_is_no_answer(server, partner):
    partner.publish(server, signer=pki.make_ca("Partner Root"))
    with pytest.raises(RevocationUnavailable, match="signature does not verify"):
        check(CrlChecker(), partner, partner.user("carol@partner.example"))


def test_an_http_error_is_no_answer(server, partner):
    server.status[partner.path] = 500
    with pytest.raises(RevocationUnavailable, match="HTTP 500") as refused:
        check(CrlChecker(), partner, partner.user("carol@partner.example"))
    assert status_of(refused.value) == 503 and refused.value.retry_after


def test_an_unreachable_distribution_point_fails_closed_and_is_not_hammered():
    partner = ExternalCA.create("Partner Root", dead_url())
    checker, user = CrlChecker(timeout=2), partner.user("carol@partner.example")
    with pytest.raises(RevocationUnavailable, match="unreachable"):
        check(checker, partner, user)
    with pytest.raises(RevocationUnavailable, match="failed a moment ago"):
        check(checker, partner, user, now=pki.NOW + FAILURE_BACKOFF - timedelta(seconds=1))
    with pytest.raises(RevocationUnavailable, match="unreachable"):
        check(checker, partner, user, now=pki.NOW + FAILURE_BACKOFF)


def test_the_next_distribution_point_is_tried(server, partner):
    user = partner.user("carol@partner.example", crl_url=[dead_url(), partner.crl_url])
    assert check(CrlChecker(timeout=2), partner, user) is False
    assert server.fetches(partner.path) == 1


def test_a_certificate_without_a_distribution_point_cannot_be_checked(partner):
    with pytest.raises(UntrustedChain, match="no HTTP CRL distribution point"):
        check(CrlChecker(), partner, partner.user("carol@partner.example", crl_url=""))


# --- through verify_user_chain ---------------------------------------------------------------------


def trust_with(partner, **policy):
    ours = pki.make_ca("Our CA")
    anchor = AnchorPolicy(name="partner", certificates=(partner.ca.cert,), **policy)
    return UserTrust(anchors=(ours.cert, partner.ca.cert), our_issuers=(ours.cert,), external=(anchor,))


def verify(trust, user):
    return verify_user_chain([user.der], trust, pki.NOW, never_revoked)


def test_an_external_certificate_revoked_in_its_crl_does_not_authenticate(server, partner):
    user = partner.user("carol@partner.example")
    partner.revoke(user)
    partner.publish(server)
    with pytest.raises(CertificateRevoked, match="revoked by its issuer's CRL"):
        verify(trust_with(partner), user)


def test_an_external_certificate_authenticates_with_its_anchor_named(server, partner):
    identity = verify(trust_with(partner, match_attribute="altSecurityIdentities"),
                      partner.user("carol@partner.example"))
    assert (identity.issuer_is_ours, identity.anchor, identity.match_attribute) == \
        (False, "partner", "altSecurityIdentities")


def test_crl_server_down_refuses_unless_the_anchor_says_revocation_none():
    partner = ExternalCA.create("Partner Root", dead_url())
    user = partner.user("carol@partner.example")
    with pytest.raises(RevocationUnavailable):
        verify(trust_with(partner), user)
    assert verify(trust_with(partner, revocation="none"), user).anchor == "partner"


def test_a_revoked_intermediate_of_an_external_anchor_does_not_authenticate(server, partner):
    issuing = partner.intermediate("Partner Issuing CA", server.url("/issuing.crl"))
    issuing.publish(server)
    user = issuing.user("carol@partner.example")
    chain = [user.der, issuing.ca.der]
    assert verify_user_chain(chain, trust_with(partner), pki.NOW, never_revoked).anchor == "partner"
    partner.revoke(issuing.ca)
    partner.publish(server)
    with pytest.raises(CertificateRevoked, match="CA certificate"):
        verify_user_chain(chain, trust_with(partner), pki.NOW, never_revoked)


def test_an_intermediate_without_a_distribution_point_cannot_be_checked(server, partner):
    intermediate = pki.make_intermediate(partner.ca, "Partner Issuing CA")
    issuing = ExternalCA(intermediate, server.url("/issuing.crl"))
    issuing.publish(server)
    user = issuing.user("carol@partner.example")
    with pytest.raises(UntrustedChain, match="no HTTP CRL distribution point"):
        verify_user_chain([user.der, intermediate.der], trust_with(partner), pki.NOW, never_revoked)


def test_our_own_certificates_are_left_to_our_database():
    ours = pki.make_ca("Our CA")
    user = pki.make_user_cert(ours, "alice@example.org")  # no distribution point: our CA answers from its records
    asked = []
    trust = UserTrust(anchors=(ours.cert,), our_issuers=(ours.cert,))
    verify_user_chain([user.der], trust, pki.NOW, lambda cert: asked.append(cert.serial_number) or False)
    assert asked == [user.cert.serial_number]
