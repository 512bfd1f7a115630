import pytest

from registration_app.auth.agent import AgentPolicy
from registration_app.core.errors import AgentNotAllowed, ConfigError
from registration_app.core.model import AgentIdentity
from bench.pki import make_ca

CA = make_ca("Scopes TLS CA")


def agent(name: str) -> AgentIdentity:
    return AgentIdentity(subject=f"CN={name}", names=frozenset({name}), certificate_der=b"", thumbprint="t")


def test_a_scoped_agent_acts_only_for_its_domains():
    policy = AgentPolicy(anchors=(CA.cert,), allowed=frozenset({"*"}),
                         scopes=frozenset({"hr01.example.org=hr.example.org", "hr01.example.org=@Example.NET"}))
    policy.check_user(agent("hr01.example.org"), "ann@hr.example.org")
    policy.check_user(agent("hr01.example.org"), "bo@example.net")
    with pytest.raises(AgentNotAllowed, match="hr.example.org"):
        policy.check_user(agent("hr01.example.org"), "ceo@example.org")
    with pytest.raises(AgentNotAllowed):
        policy.check_user(agent("hr01.example.org"), "x@evil.hr.example.org.attacker")
    policy.check_user(agent("mail01.example.org"), "anyone@anywhere.example")  # unscoped agent


def test_scope_entries_must_name_agent_and_domain():
    with pytest.raises(ConfigError):
        AgentPolicy(anchors=(CA.cert,), allowed=frozenset({"*"}), scopes=frozenset({"no-domain"}))
