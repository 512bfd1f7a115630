"""Where an enrollment's time goes: the real request path (create_app + Flask's test client, the real
slapd and SQLite, no TLS) under cProfile, in this process."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from .client import AgentConnection


def profile_enrollments(platform, users: list, payload: dict, *, top: int = 25) -> dict:
    from registration_app.agent.jws import sign_user_request, thumbprint
    from registration_app.services import build_services
    from registration_app.web.app import create_app
    from cryptography import x509

    settings = platform.settings()
    services = build_services(settings, run_migrations=False)
    app = create_app(settings, services)
    client = app.test_client()
    agent_der = x509.load_pem_x509_certificate(Path(platform.agent_cert).read_bytes()).public_bytes(Encoding.DER)
    environ = {"autoenroll.peer_certificate": agent_der}
    base = platform.url
    url = AgentConnection(platform.url, ca=platform.tls_ca, cert=None, key=None).url("enroll")
    profiler = cProfile.Profile()
    statuses: dict[int, int] = {}
    try:
        for user in users:
            profiler.enable()
            nonce = client.get("/api/v1/nonce", base_url=base, environ_base=environ).get_json()["nonce"]
            profiler.disable()
            body = sign_user_request(payload, key=user.key, chain=list(user.chain), nonce=nonce, url=url,
                                     agent_thumbprint=thumbprint(agent_der))  # the client's work: not profiled
            profiler.enable()
            reply = client.post("/api/v1/enroll", data=body, base_url=base, environ_base=environ,
                                headers={"Content-Type": "application/jose+json"})
            profiler.disable()
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
    finally:
        services.close()
    profiler.dump_stats(str(Path(__file__).resolve().parent / "results" / "profile.pstats"))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    by_tottime = out.getvalue()
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("cumulative").print_stats(top + 15)
    total = sum(v[2] for v in stats.stats.values())  # tottime summed over functions
    return {"statuses": statuses, "total_s": round(total, 3), "by_tottime": by_tottime,
            "by_cumulative": out.getvalue(), "buckets": _buckets(stats, total)}


# Coarse buckets: which functions' cumulative time answers "where does an enrollment go".
_BUCKETS = {
    "pkcs12": ("pkcs12.py", "to_pkcs12"),
    "escrow (seal + commit)": ("kra.py", "escrow"),
    "CA sign + record": ("ca.py", "sign"),
    "JWS + chain verification": ("jws.py", "verify_user_request"),
    "agent identification": ("agent.py", "identify_agent"),
    "entitlement (LDAP + audit)": ("service.py", "entitled_user"),
    "policy read (replacement/rate)": ("service.py", "_replacement_of"),
    "publish inline (LDAP)": ("service.py", "publish_now"),
    "nonce issue": ("repos.py", "issue_nonce"),
    "nonce consume": ("repos.py", "consume_nonce"),
    "denial audit": ("errors.py", "_record_denial"),
}


def _buckets(stats: pstats.Stats, total: float) -> dict:
    result = {}
    for label, (filename, function) in _BUCKETS.items():
        cumulative = sum(v[3] for (file, _line, name), v in stats.stats.items()
                         if file.endswith(filename) and name == function)
        result[label] = {"seconds": round(cumulative, 3), "share": round(cumulative / total, 3) if total else 0.0}
    return result
