"""The bare pipeline: the cryptographic work of one enrollment and its LDAP write, in a tight loop,
with no HTTP, no JWS, no database, no entitlement lookup.

Per certificate: EC P-256 key (or RSA from nothing: not used here), sign with the platform's CA key
(the same certificate builder as the server), seal for escrow (AES-256-GCM + RSA-OAEP wrap with the KRA
key), PKCS#12 at the server's iteration count (optional), one python-ldap modify (replace
userCertificate;binary) on a user's entry, with the client library the server publishes with.
`processes=2` runs two such loops at once, in separate processes, to give the rate of the cores the
server has.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class BareJob:
    data_dir: Path
    passphrase: bytes
    ldap_url: str
    bind_dn: str
    password: str
    dns: tuple[str, ...]
    iterations: int = 2048
    pkcs12: bool = True
    seconds: float = 3.0
    max_count: int = 1_000_000


def _loop(job: BareJob, start_at: float | None = None) -> tuple[int, float, float]:
    """(certificates, wall seconds, CPU seconds of this process)."""
    import ldap
    from cryptography.hazmat.primitives.serialization import Encoding

    from registration_app.authorities.certs import CaUrls, build_smime_certificate, random_serial
    from registration_app.authorities.escrow_crypto import escrow_aad, seal_private_key
    from registration_app.authorities.pkcs12 import to_pkcs12
    from registration_app.authorities.pki_files import read_cert, read_private_key, read_public_key
    from registration_app.core.model import Subject
    from registration_app.core.profiles import parse_profiles
    from registration_app.settings import DEFAULT_PROFILES

    ca_cert = read_cert(job.data_dir / "ca.pem")
    ca_key = read_private_key(job.data_dir / "ca.key", job.passphrase)
    kra = read_public_key(job.data_dir / "kra.pem")
    profile = parse_profiles(DEFAULT_PROFILES)["smime-encryption-ec"]
    urls = CaUrls(crl_url="http://127.0.0.1/crl/ca.crl", ca_issuers_url="http://127.0.0.1/ca.crt")
    conn = ldap.initialize(job.ldap_url)  # python-ldap, the client the server publishes with
    conn.simple_bind_s(job.bind_dn, job.password)
    if start_at is not None:
        while time.time() < start_at:
            time.sleep(0.001)
    count = 0
    cpu0, started = time.process_time(), time.perf_counter()
    while count < job.max_count and time.perf_counter() - started < job.seconds:
        dn = job.dns[count % len(job.dns)]
        email = dn.split(",", 1)[0].split("=", 1)[1] + "@example.org"
        key = ec.generate_private_key(ec.SECP256R1())
        serial = random_serial()
        now = datetime.now(timezone.utc)
        blob = seal_private_key(key, kra, escrow_aad(serial, email, profile.name))
        cert = build_smime_certificate(ca_cert=ca_cert, ca_key=ca_key, public_key=key.public_key(),
                                       profile=profile, subject=Subject(email=email), now=now, urls=urls,
                                       serial=serial)
        if job.pkcs12:
            to_pkcs12(key=key, cert=cert, chain=[ca_cert], password="bench-password",
                      friendly_name=f"{email} {profile.name}", iterations=job.iterations)
        conn.modify_ext_s(dn, [(ldap.MOD_REPLACE, "userCertificate;binary", [cert.public_bytes(Encoding.DER)])])
        del blob
        count += 1
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    conn.unbind_s()
    return count, wall, cpu


def _child(job: BareJob, start_at: float, out) -> None:
    out.put(_loop(job, start_at))


@dataclass
class BareResult:
    processes: int
    count: int
    rate: float  # certificates per second, all processes together
    cpu: float
    slapd_cpu: float = 0.0  # slapd's CPU for the modifies, counted as ours is in the per-CPU ratio

    def summary(self) -> dict:
        return {"processes": self.processes, "certificates": self.count, "rate_per_s": round(self.rate, 1),
                "cpu_s": round(self.cpu, 2), "slapd_cpu_s": round(self.slapd_cpu, 2),
                "per_core_rate": round(self.count / self.cpu, 1) if self.cpu else 0.0}


def run_bare(job: BareJob, processes: int = 1, *, slapd_pid: int | None = None) -> BareResult:
    from .platform import process_cpu
    slapd0 = process_cpu(slapd_pid) if slapd_pid else 0.0
    if processes == 1:
        count, wall, cpu = _loop(job)
        return BareResult(1, count, count / wall, cpu, (process_cpu(slapd_pid) - slapd0) if slapd_pid else 0.0)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or connections
    out = ctx.Queue()
    start_at = time.time() + 2.0  # spawn + imports + key loading happen before the common start
    children = []
    for i in range(processes):
        dns = job.dns[i::processes] or job.dns
        child = ctx.Process(target=_child, args=(BareJob(**{**job.__dict__, "dns": dns}), start_at, out))
        child.start()
        children.append(child)
    results = [out.get(timeout=job.seconds + 120) for _ in children]
    for child in children:
        child.join()
    count = sum(r[0] for r in results)
    return BareResult(processes, count, sum(r[0] / r[1] for r in results), sum(r[2] for r in results),
                      (process_cpu(slapd_pid) - slapd0) if slapd_pid else 0.0)
