"""One key policy for every key the server accepts: the x5c chain (leaf and intermediates), CSRs and the
agents' TLS certificates. The request-level cases (the signature is never checked with a weak key, the
nonce survives) are in test_jws.py; the same attacks against the real server in tests/adversarial."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from registration_app.auth.agent import AgentPolicy, identify_agent
from registration_app.auth.chain import UserTrust, verify_user_chain
from registration_app.auth.keypolicy import check_public_key
from registration_app.core.errors import WeakKey
from registration_app.web.status import status_of
from bench import pki

WEAK = {
    "rsa1024": lambda: pki.new_key("rsa1024"),
    "p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
}
STRONG = {
    "rsa2048": lambda: pki.new_key("rsa"),
    "rsa3072": lambda: pki.new_key("rsa3072"),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
}


def never_revoked(cert) -> bool:
    return False


@pytest.mark.parametrize("make", STRONG.values(), ids=STRONG.keys())
def test_accepted_keys(make):
    check_public_key(make().public_key(), "the key")


@pytest.mark.parametrize("make", WEAK.values(), ids=WEAK.keys())
def test_weak_keys_are_refused_with_what_was_found_and_what_is_accepted(make):
    with pytest.raises(WeakKey) as refused:
        check_public_key(make().public_key(), "the test key")
    assert status_of(refused.value) == 400 and refused.value.code == "weak_key"
    assert refused.value.detail.startswith("the test key is ")
    assert "RSA of 2048 to 8192 bits, or EC on P-256, P-384 or P-521" in refused.value.detail


def test_other_key_types_are_refused():
    with pytest.raises(WeakKey, match="Ed25519"):
        check_public_key(ed25519.Ed25519PrivateKey.generate().public_key(), "the key")


@pytest.mark.parametrize("make", WEAK.values(), ids=WEAK.keys())
def test_a_weak_user_certificate_key_is_refused_before_the_chain_is_built(make):
    root = pki.make_ca("User Root")
    user = pki.make_user_cert(root, "alice@example.org", key=make())
    with pytest.raises(WeakKey, match="user certificate's key"):
        verify_user_chain([user.der], UserTrust(anchors=(root.cert,)), pki.NOW, never_revoked)


def test_a_weak_intermediate_is_refused():
    root = pki.make_ca("User Root")
    weak_intermediate = pki.make_intermediate(root, "Weak Issuing CA", key_type="rsa1024")
    user = pki.make_user_cert(weak_intermediate, "alice@example.org")
    with pytest.raises(WeakKey, match=r"x5c\[1\] is RSA-1024"):
        verify_user_chain([user.der, weak_intermediate.der], UserTrust(anchors=(root.cert,)), pki.NOW,
                          never_revoked)


@pytest.mark.parametrize("make", WEAK.values(), ids=WEAK.keys())
def test_a_weak_agent_certificate_is_refused(make):
    agent_ca = pki.make_ca("Agent CA")
    cert = pki.make_agent_cert(agent_ca, "mail.example.org", key=make())
    with pytest.raises(WeakKey, match="TLS client certificate"):
        identify_agent(cert.der, AgentPolicy(anchors=(agent_ca.cert,), allowed=frozenset({"*"})), pki.NOW)
