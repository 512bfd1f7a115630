"""What the platform recorded and published, read the way an auditor would: the database rows, the
directory through an anonymous ldapsearch (not our code), escrowed keys opened with the KRA key."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select

from bench import world
from bench.client import AgentConnection
from bench.platform import Stack, eventually, transaction
from registration_app.authorities.escrow_crypto import escrow_aad, open_private_key
from registration_app.authorities.pki_files import read_private_key
from registration_app.store.db import Database
from registration_app.store.models import AuditEvent, Certificate, Escrow, Outbox

FAST = {"pkcs12_iterations": 2048, "outbox_interval_seconds": 0.3}


def database(platform) -> Database:
    return Database(platform.db_url)


def counts(platform) -> dict:
    with transaction(platform.db_url) as s:
        return {"certificates": s.execute(select(func.count()).select_from(Certificate)).scalar_one(),
                "escrow": s.execute(select(func.count()).select_from(Escrow)).scalar_one(),
                "outbox": s.execute(select(func.count()).select_from(Outbox)).scalar_one(),
                "audit": s.execute(select(func.max(AuditEvent.id))).scalar_one() or 0}


def audit_since(platform, after_id: int) -> list[AuditEvent]:
    with transaction(platform.db_url) as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.id > after_id)
                              .order_by(AuditEvent.id)).scalars())


def certificates(platform, profile: str | None = None) -> list[Certificate]:
    with transaction(platform.db_url) as s:
        query = select(Certificate)
        if profile:
            query = query.where(Certificate.profile == profile)
        return list(s.execute(query).scalars())


def escrow_rows(platform) -> dict[str, Escrow]:
    with transaction(platform.db_url) as s:
        return {row.serial: row for row in s.execute(select(Escrow)).scalars()}


def outbox_serials(platform) -> set[str]:
    with transaction(platform.db_url) as s:
        return {serial for (serial,) in s.execute(select(Outbox.serial).where(Outbox.serial.is_not(None)))}


def ldap_values(ldap_url: str, email: str) -> list[bytes]:
    """What a mail client sees: anonymous ldapsearch by mail."""
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", ldap_url,
                          "-b", world.PEOPLE, f"(mail={email})", "userCertificate;binary"],
                         capture_output=True, text=True, check=True).stdout
    return [base64.b64decode(line.split(":: ", 1)[1]) for line in out.splitlines()
            if line.lower().startswith("usercertificate;binary::")]


def all_ldap_values(ldap_url: str) -> dict[str, list[bytes]]:
    """mail -> userCertificate;binary values of every user, in one anonymous search."""
    out = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", ldap_url, "-b", world.PEOPLE,
                          "(mail=*)", "mail", "userCertificate;binary"],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, list[bytes]] = {}
    for block in out.split("\n\n"):
        mail, values = None, []
        for line in block.splitlines():
            if line.lower().startswith("mail: "):
                mail = line.split(": ", 1)[1]
            elif line.lower().startswith("usercertificate;binary::"):
                values.append(base64.b64decode(line.split(":: ", 1)[1]))
        if mail:
            result[mail] = values
    return result


def recovered_key_matches(platform, row: Escrow, cert: x509.Certificate) -> bool:
    kra_key = read_private_key(platform.data / "kra.key", platform.passphrase)
    key = open_private_key(row.blob, kra_key, escrow_aad(cert.serial_number, row.email, row.profile))
    spki = PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(Encoding.DER, spki) == cert.public_key().public_bytes(Encoding.DER, spki)


def assert_each_issued_published_once_and_escrowed(w, final: dict, profile: str, n: int) -> None:
    """After a fault: once the outbox has drained by itself (`autoenroll sync status`), every user has
    exactly one certificate, the one delivered to them, published exactly once, with its key in escrow."""
    def drained():
        status = json.loads(w.platform.autoenroll("sync", "status").stdout)
        return status if status["depth"] == 0 else None

    eventually(drained, timeout=120, what="the outbox to drain")
    issued = certificates(w.platform, profile)
    assert len(issued) == n
    escrow = escrow_rows(w.platform)
    published = all_ldap_values(w.slapd.url)
    delivered = {email: x509.load_pem_x509_certificate(reply.json()["certificate"].encode())
                 for email, reply in final.items()}
    for row in issued:
        cert = x509.load_der_x509_certificate(row.der)
        # exactly once in the directory, and nothing else of ours next to it
        assert published[row.email] == [row.der], (row.email, len(published[row.email]))
        assert delivered[row.email].serial_number == cert.serial_number
        assert recovered_key_matches(w.platform, escrow[row.serial], cert)


class World(Stack):
    """A private slapd with `n` entitled users and a platform on it (for suites that break things)."""

    def __init__(self, folder: Path, n: int, **settings):
        self.uids = world.new_uids(n, prefix="f" + uuid.uuid4().hex[:4])
        super().__init__(folder, ldif=world.users_ldif(self.uids), **{**FAST, **settings})
        try:
            self.minter = world.Minter(self.platform.data, self.platform.passphrase)
            self.users = self.minter.users(self.uids)
        except BaseException:
            self.close()
            raise

    def connection(self) -> AgentConnection:
        return AgentConnection.for_platform(self.platform)


def enroll_all(world_, users, payload: dict, *, agents: int = 4, on_progress=None, retry_until: float = 0.0,
               history: dict | None = None):
    """Each user enrolls once (retrying refusals with 5xx/connection errors while time.monotonic() <
    retry_until). Returns {email: final Reply or the exception}, and every reply seen in order.
    `history`, if given, gets every attempt's outcome per email (status and body, or the exception)."""
    import queue
    import time
    work: queue.SimpleQueue = queue.SimpleQueue()
    for user in users:
        work.put(user)
    final: dict = {}
    seen: list = []
    lock = threading.Lock()

    def agent():
        conn = world_.connection()
        conn.resend_on_reset = False  # a lost reply must show as lost, not be hidden by a resend
        try:
            while True:
                try:
                    user = work.get_nowait()
                except queue.Empty:
                    return
                while True:
                    try:
                        reply = conn.enroll(user, payload)
                    except Exception as exc:  # noqa: BLE001 - a killed worker or slapd shows up here
                        conn.close()
                        reply = exc
                    with lock:
                        seen.append(reply)
                        done = len(seen)
                        if history is not None:
                            history.setdefault(user.email, []).append(
                                f"{reply.status} {reply.body[:300]!r}" if hasattr(reply, "status") else repr(reply))
                    if on_progress:
                        on_progress(done)
                    retry = not hasattr(reply, "status") or reply.status >= 500
                    if retry and time.monotonic() < retry_until:
                        time.sleep(0.1)
                        continue
                    final[user.email] = reply
                    break
        finally:
            conn.close()

    threads = [threading.Thread(target=agent) for _ in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return final, seen
