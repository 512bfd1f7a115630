"""Who is asking: the user server (TLS client certificate) and the user (JWS signed with their certificate).

Public surface; the modules behind it are agent.py, chain.py, jws.py and csr.py.
"""

from .agent import AgentPolicy, identify_agent, thumbprint
from .chain import UserTrust, verify_user_chain
from .csr import verify_csr
from .jws import verify_bootstrap_request, verify_user_request

__all__ = [
    "AgentPolicy",
    "UserTrust",
    "identify_agent",
    "thumbprint",
    "verify_bootstrap_request",
    "verify_csr",
    "verify_user_chain",
    "verify_user_request",
]
