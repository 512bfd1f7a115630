"""Where an enrollment's time goes: the real request path (create_app + Flask's test client, the real
slapd and SQLite, no TLS) under cProfile, in this process."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from .client import AgentConnection, peer_environ


# Where a request's CPU goes without a profiler's distortion (cProfile inflates Python-heavy code two-
# to threefold): these functions are wrapped to sum this thread's CPU time (time.thread_time) inside
# them. Nested phases are counted in both (pkcs12 inside issue).
_PHASES = {
    "request (all)": None,
    "verify JWS + chain + nonce check": ("registration_app.web.api", "verify_user_request"),
    "  of which chain": ("registration_app.auth.jws", "verify_user_chain"),
    "  of which nonce check": ("registration_app.auth.request_checks", "RequestChecks.nonce_unused"),
    "  of which is_revoked": ("registration_app.auth.request_checks", "RequestChecks.is_revoked"),
    "entitlement (LDAP)": ("registration_app.ra.authority", "RegistrationAuthority.entitled_user"),
    "policy read": ("registration_app.ra.authority", "RegistrationAuthority._replacement_of"),
    "issue (all)": ("registration_app.authorities.key_authority", "LocalKeyAuthority.issue"),
    "  seal": ("registration_app.authorities.kra", "LocalKRA.seal"),
    "  sign": ("registration_app.authorities.ca", "LocalCA.build_certificate"),
    "  transaction": ("registration_app.store.db", "Database.run"),
    "  audit rows": ("registration_app.store.audit", "append_many"),
    "  pkcs12": ("registration_app.authorities.key_authority", "to_pkcs12"),
    "publish inline": ("registration_app.ra.authority", "RegistrationAuthority.publish_now"),
    "agent check (allow-list, revoked?)": ("registration_app.web.api", "identify_agent"),
    "  of which the request's one read": ("registration_app.auth.request_checks", "request_facts"),
    "next nonce (Replay-Nonce)": ("registration_app.auth.nonces", "issue_nonce"),
    "response JSON": ("registration_app.web.api", "jsonify"),
}
# The phases that do not nest in another: what they leave of "request (all)" is Flask, werkzeug, the
# app's hooks and logging.
_TOP_LEVEL = ("verify JWS + chain + nonce check", "entitlement (LDAP)", "policy read", "issue (all)",
              "publish inline", "agent check (allow-list, revoked?)", "next nonce (Replay-Nonce)", "response JSON")


def cpu_by_phase(platform, users: list, payload: dict) -> dict:
    """Thread CPU per enrollment by phase (ms), in-process (Flask test client: no TLS, no gunicorn)."""
    import importlib
    import time

    from cryptography import x509

    from registration_app.agent.jws import sign_user_request, thumbprint
    from registration_app.wiring import build_services
    from registration_app.web.app import create_app

    import threading
    me = threading.get_ident()
    totals: dict[str, float] = {name: 0.0 for name in _PHASES}
    patched = []
    for name, target in _PHASES.items():
        if target is None:
            continue
        module = importlib.import_module(target[0])
        owner, attr = (module, target[1]) if "." not in target[1] else \
            (getattr(module, target[1].split(".")[0]), target[1].split(".")[1])
        original = getattr(owner, attr)

        def timed(*args, __original=original, __name=name, **kwargs):
            if threading.get_ident() != me:  # e.g. the completions thread: not the request's CPU
                return __original(*args, **kwargs)
            t0 = time.thread_time()
            try:
                return __original(*args, **kwargs)
            finally:
                totals[__name] += time.thread_time() - t0

        setattr(owner, attr, timed)
        patched.append((owner, attr, original))
    settings = platform.settings()
    services = build_services(settings, run_migrations=False)
    try:
        app = create_app(settings, services)
        client = app.test_client()
        agent_der = x509.load_pem_x509_certificate(Path(platform.agent_cert).read_bytes()).public_bytes(Encoding.DER)
        environ = peer_environ(agent_der)
        url = AgentConnection(platform.url, ca=platform.tls_ca, cert=None, key=None).url("enroll")
        ok = 0
        for user in users:
            nonce = client.get("/api/v1/nonce", base_url=platform.url, environ_base=environ).get_json()["nonce"]
            body = sign_user_request(payload, key=user.key, chain=list(user.chain), nonce=nonce, url=url,
                                     agent_thumbprint=thumbprint(agent_der))
            t0 = time.thread_time()
            reply = client.post("/api/v1/enroll", data=body, base_url=platform.url, environ_base=environ,
                                headers={"Content-Type": "application/jose+json"})
            totals["request (all)"] += time.thread_time() - t0
            ok += reply.status_code == 201
        services.publisher.completions.flush()
    finally:
        for owner, attr, original in patched:
            setattr(owner, attr, original)
        services.close()
    totals["rest: Flask, werkzeug, hooks, logging"] = totals["request (all)"] - sum(totals[k] for k in _TOP_LEVEL)
    return {"enrollments": ok, "ms_per_enrollment": {k: round(1000 * v / max(ok, 1), 3) for k, v in totals.items()}}


def profile_enrollments(platform, users: list, payload: dict, *, top: int = 25) -> dict:
    from registration_app.agent.jws import sign_user_request, thumbprint
    from registration_app.wiring import build_services
    from registration_app.web.app import create_app
    from cryptography import x509

    settings = platform.settings()
    services = build_services(settings, run_migrations=False)
    app = create_app(settings, services)
    client = app.test_client()
    agent_der = x509.load_pem_x509_certificate(Path(platform.agent_cert).read_bytes()).public_bytes(Encoding.DER)
    environ = peer_environ(agent_der)
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
    "entitlement (LDAP + audit)": ("ra/authority.py", "entitled_user"),
    "policy read (replacement/rate)": ("ra/authority.py", "_replacement_of"),
    "publish inline (LDAP)": ("ra/authority.py", "publish_now"),
    "nonce issue": ("repos.py", "issue_nonce"),
    "nonce consume": ("repos.py", "consume_nonce"),
    "denial audit": ("ra/authority.py", "refused"),
}


def _buckets(stats: pstats.Stats, total: float) -> dict:
    result = {}
    for label, (filename, function) in _BUCKETS.items():
        cumulative = sum(v[3] for (file, _line, name), v in stats.stats.items()
                         if file.endswith(filename) and name == function)
        result[label] = {"seconds": round(cumulative, 3), "share": round(cumulative / total, 3) if total else 0.0}
    return result
