import base64
import hashlib

import pytest

from registration_app.agent import jws as agent_jws
from registration_app.auth.agent import AgentPolicy, identify_agent, thumbprint
from registration_app.core.errors import (
    AgentNotAllowed,
    BadClientCertificate,
    ConfigError,
    NoClientCertificate,
)
from bench import pki


@pytest.fixture(scope="module")
def agent_ca():
    return pki.make_ca("Agent CA")


def policy(agent_ca, *allowed: str) -> AgentPolicy:
    return AgentPolicy(anchors=(agent_ca.cert,), allowed=frozenset(allowed))


def test_identifies_an_allowed_agent(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org")
    agent = identify_agent(cert.der, policy(agent_ca, "mail.example.org"), pki.NOW)
    assert agent.subject == "CN=mail.example.org,O=Autoenroll Agents"
    assert "mail.example.org" in agent.names
    assert agent.certificate_der == cert.der
    expected = base64.urlsafe_b64encode(hashlib.sha256(cert.der).digest()).rstrip(b"=").decode()
    assert agent.thumbprint == expected == thumbprint(cert.der) == agent_jws.thumbprint(cert.der)
    assert "=" not in agent.thumbprint


@pytest.mark.parametrize("peer", [None, b""])
def test_no_certificate(agent_ca, peer):
    with pytest.raises(NoClientCertificate):
        identify_agent(peer, policy(agent_ca, "*"), pki.NOW)


@pytest.mark.parametrize("garbage", [b"\x00", b"not a certificate", b"\x30\x82\x01\x00" + b"\x00" * 10])
def test_garbage_is_a_bad_certificate(agent_ca, garbage):
    with pytest.raises(BadClientCertificate):
        identify_agent(garbage, policy(agent_ca, "*"), pki.NOW)


def test_truncated_certificate(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org")
    with pytest.raises(BadClientCertificate):
        identify_agent(cert.der[:-10], policy(agent_ca, "*"), pki.NOW)


def test_certificate_from_another_ca_is_not_trusted(agent_ca):
    stranger = pki.make_agent_cert(pki.make_ca("Other CA"), "mail.example.org")
    with pytest.raises(BadClientCertificate, match="not trusted"):
        identify_agent(stranger.der, policy(agent_ca, "*"), pki.NOW)


def test_expired_agent_certificate(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org", not_before=pki.NOW - 30 * pki.DAY,
                               not_after=pki.NOW - pki.DAY)
    with pytest.raises(BadClientCertificate):
        identify_agent(cert.der, policy(agent_ca, "*"), pki.NOW)


def test_a_user_smime_certificate_is_not_an_agent(agent_ca):
    user = pki.make_user_cert(agent_ca, "alice@example.org")
    with pytest.raises(BadClientCertificate, match="clientAuth"):
        identify_agent(user.der, policy(agent_ca, "*"), pki.NOW)


@pytest.mark.parametrize("eku", [(pki.SERVER_AUTH,), (pki.CLIENT_AUTH,), (pki.SERVER_AUTH, pki.CLIENT_AUTH)])
def test_server_or_client_auth_eku_is_enough(agent_ca, eku):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org", eku=eku)
    assert identify_agent(cert.der, policy(agent_ca, "*"), pki.NOW).names == {"mail.example.org"}


def test_missing_eku_is_refused(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org", eku=None)
    with pytest.raises(BadClientCertificate):
        identify_agent(cert.der, policy(agent_ca, "*"), pki.NOW)


@pytest.mark.parametrize(
    "allowed",
    ["*", "mail.example.org", "MAIL.example.org", "CN=mail.example.org,O=Autoenroll Agents"],
)
def test_allow_list_matches_dns_cn_or_subject(agent_ca, allowed):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org")
    agent = identify_agent(cert.der, policy(agent_ca, allowed), pki.NOW)
    assert "mail.example.org" in agent.names and agent.certificate_der == cert.der


def test_agent_not_on_allow_list(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "rogue.example.org")
    with pytest.raises(AgentNotAllowed, match="rogue.example.org"):
        identify_agent(cert.der, policy(agent_ca, "mail.example.org", "example.org"), pki.NOW)


def test_empty_allow_list_allows_nobody(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org")
    with pytest.raises(AgentNotAllowed):
        identify_agent(cert.der, policy(agent_ca), pki.NOW)


def test_issuing_intermediate_can_be_the_anchor(agent_ca):
    issuing = pki.make_intermediate(agent_ca, "Agent Issuing CA")
    cert = pki.make_agent_cert(issuing, "mail.example.org")
    agent = identify_agent(cert.der, AgentPolicy(anchors=(issuing.cert,), allowed=frozenset({"*"})), pki.NOW)
    assert "mail.example.org" in agent.names and agent.thumbprint == thumbprint(cert.der)


def test_rsa_agent(agent_ca):
    cert = pki.make_agent_cert(agent_ca, "mail.example.org", key_type="rsa")
    agent = identify_agent(cert.der, policy(agent_ca, "*"), pki.NOW)
    assert "mail.example.org" in agent.names and agent.certificate_der == cert.der


def test_no_anchors_is_a_configuration_error():
    with pytest.raises(ConfigError):
        AgentPolicy(anchors=(), allowed=frozenset({"*"}))
