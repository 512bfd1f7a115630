"""Peers on the same machine, in the same run: Debian's `cfssl serve` (new key + certificate over HTTP)
and a plain openssl CLI script per certificate."""

from __future__ import annotations

import http.client
import json
import queue
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from directory_sync.slapd import free_port

from .load import percentile
from .platform import eventually, process_cpu

CFSSL = shutil.which("cfssl") or "/usr/bin/cfssl"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

WHAT_THEY_SKIP = ("ours, not theirs: mTLS agent check, JWS + user chain verification, single-use nonce, LDAP "
                  "entitlement lookups, escrow (sealed, committed with fsync), certificate/outbox/audit rows "
                  "(SQLite WAL, synchronous=FULL, hash-chained audit), PKCS#12 (the openssl "
                  "script does PKCS#12 too, at the same iteration count), LDAP publication")
WHAT_WE_SKIP = ("theirs, not ours: cfssl builds and signs a CSR for the new key and returns it; the openssl "
                "script starts 4 processes and reads/writes PEM files per certificate")


@dataclass
class PeerResult:
    name: str
    count: int
    wall: float
    cpu: float
    p99_ms: float = 0.0

    def summary(self) -> dict:
        return {"certificates": self.count, "wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3),
                "rate_per_s": round(self.count / self.wall, 1) if self.wall else 0.0,
                "per_core_rate": round(self.count / self.cpu, 1) if self.cpu else 0.0,
                "p99_ms": round(self.p99_ms, 1)}


def write_ca(folder: Path) -> tuple[Path, Path]:
    """A throw-away EC P-256 CA in PEM (cfssl and openssl read the unencrypted key)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Peer Bench CA")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "ca.pem", folder / "ca-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


CFSSL_CONFIG = {
    "signing": {
        "default": {"expiry": "8760h", "usages": ["key agreement", "email protection"]},
        "profiles": {"smime": {"expiry": "8760h", "usages": ["key agreement", "email protection"]}},
    }
}


def bench_cfssl(folder: Path, *, count: int, agents: int = 8) -> PeerResult:
    """`cfssl serve`; each of `agents` threads POSTs /api/v1/cfssl/newcert over a keep-alive connection."""
    ca, ca_key = write_ca(folder)
    config = folder / "cfssl.json"
    config.write_text(json.dumps(CFSSL_CONFIG))
    port = free_port()
    log = open(folder / "cfssl.log", "wb")
    proc = subprocess.Popen([CFSSL, "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", str(ca),
                             "-ca-key", str(ca_key), "-config", str(config), "-loglevel", "5"],
                            stdout=log, stderr=log)
    try:
        _wait_port(port, proc)
        work: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            work.put(i)
        latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        ready = threading.Barrier(agents + 1)

        def body(i: int) -> bytes:
            email = f"peer{i}@example.org"
            return json.dumps({"request": {"CN": email, "hosts": [email], "key": {"algo": "ecdsa", "size": 256}},
                               "profile": "smime"}).encode()

        def agent() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/api/v1/cfssl/newcert", body(-1), {"Content-Type": "application/json"})
            conn.getresponse().read()
            ready.wait()
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    break
                started = time.perf_counter()
                conn.request("POST", "/api/v1/cfssl/newcert", body(i), {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status == 200 and json.loads(data).get("success"):
                        latencies.append(elapsed)
                    else:
                        failures.append(data[:200].decode(errors="replace"))
            conn.close()

        threads = [threading.Thread(target=agent, daemon=True) for _ in range(agents)]
        for t in threads:
            t.start()
        ready.wait()
        cpu0, started = process_cpu(proc.pid), time.perf_counter()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - started, process_cpu(proc.pid) - cpu0
        if failures:
            raise RuntimeError(f"cfssl refused {len(failures)} requests: {failures[0]}")
        return PeerResult("cfssl", len(latencies), wall, cpu, percentile(latencies, 99) * 1000)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


OPENSSL_SCRIPT = r"""#!/bin/sh
# One S/MIME encryption certificate with the openssl CLI: key, CSR, signed certificate, PKCS#12.
set -e
d=$1; email=$2; iter=$3
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/key.pem" 2>/dev/null
openssl req -new -key "$d/key.pem" -subj "/CN=$email/emailAddress=$email" -out "$d/req.csr"
openssl x509 -req -in "$d/req.csr" -CA "$d/../ca.pem" -CAkey "$d/../ca-key.pem" -set_serial "0x$(openssl rand -hex 16)" \
  -days 365 -extfile "$d/../ext.cnf" -extensions smime -out "$d/cert.pem" 2>/dev/null
openssl pkcs12 -export -inkey "$d/key.pem" -in "$d/cert.pem" -certfile "$d/../ca.pem" -passout pass:bench-password \
  -iter "$iter" -macalg sha256 -out "$d/user.p12"
"""

EXT_CNF = """[smime]
basicConstraints = critical, CA:FALSE
keyUsage = critical, keyAgreement
extendedKeyUsage = emailProtection
subjectAltName = email:copy
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def bench_openssl(folder: Path, *, count: int, iterations: int) -> PeerResult:
    """The script, once per certificate, sequentially; CPU is that of the child processes."""
    write_ca(folder)
    (folder / "ext.cnf").write_text(EXT_CNF)
    script = folder / "issue.sh"
    script.write_text(OPENSSL_SCRIPT)
    script.chmod(0o755)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    latencies = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        subprocess.run([str(script), str(work), f"peer{i}@example.org", str(iterations)], check=True,
                       capture_output=True)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return PeerResult("openssl", count, wall, cpu, percentile(latencies, 99) * 1000)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    import socket

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"cfssl exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    eventually(listening, timeout=timeout, step=0.05, what="cfssl serve to listen")
