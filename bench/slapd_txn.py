"""`python -m bench.slapd_txn`: does slapd survive LDAP transactions (RFC 5805) as the request path sends
them? Not part of the suite (it runs until slapd dies or --rounds pass); PERFORMANCE.md has its findings.

A private slapd from ldap_schema/ (memberOf, refint and constraint overlays, as everywhere), USERS users,
and --procs processes, each with its own connection, sending transactions of --batch modifies of
`userCertificate;binary` as directory_sync/inline.py does (each asserting the entryCSN it read, RFC 4528),
at once, until slapd is gone or every process has sent --rounds. The ingredients can be changed one at a
time: the same or different entries (--shared), no assertion (--no-assert), plain modifies on the same
entries from other processes (--plain, the outbox worker), an aborted transaction every so often
(--abort-every), one modify in flight at a time instead of pipelined (--one-at-a-time), and the way the
transaction is sent: `project` (directory_sync/ldap_txn.modify_all as it is, with its pause before the end),
`raw` (RFC 5805 with nothing more: start, the modifies, end as soon as their answers are in; --end-pause
adds a pause of its own). Debian 12's slapd 2.5.13 dies within seconds with `--way raw` (2 processes, or
1 with --plain 1); see PERFORMANCE.md, "LDAP transactions and slapd".

It prints, per run, the transactions committed and refused, whether slapd is still there, and the
kernel's lines about slapd that appeared meanwhile (`dmesg`, when readable).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import ldap
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from ldap.controls.libldap import AssertionControl

from directory_sync import connection, ldap_txn
from directory_sync.config import LdapSettings
from directory_sync.escape import filter_value
from directory_sync.slapd import PrivateSlapd

from . import world

CERTIFICATE = "userCertificate;binary"


def certificates(count: int) -> list[bytes]:
    """Distinct DER certificates (slapd checks the syntax of userCertificate;binary)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    out = []
    for i in range(count):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"txn {i}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
        out.append(cert.public_bytes(Encoding.DER))
    return out


def entry_csns(conn, dns: list[str]) -> list[str]:
    out = []
    for dn in dns:
        found = conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", ["entryCSN"], timeout=10)
        out.append(found[0][1]["entryCSN"][0].decode())
    return out


def raw_transaction(conn, updates, *, one_at_a_time: bool, abort: bool, pause: float = 0.0) -> bool:
    """RFC 5805 and nothing more: start, the modifies (pipelined unless one_at_a_time), end (`pause`
    seconds after the last modify's answer)."""
    identifier = ldap_txn.start(conn)
    spec = ldap_txn.control(identifier)
    refused = False
    if one_at_a_time:
        for dn, ops, controls in updates:
            try:
                conn.modify_ext_s(dn, ops, serverctrls=[spec, *controls])
            except ldap.LDAPError as exc:
                if not connection.answered(exc):
                    raise
                refused = True
    else:
        sent = [conn.modify_ext(dn, ops, serverctrls=[spec, *controls]) for dn, ops, controls in updates]
        for msgid in sent:
            try:
                conn.result3(msgid, timeout=10)
            except ldap.LDAPError as exc:
                if not connection.answered(exc):
                    raise
                refused = True
    if pause:
        time.sleep(pause)
    try:
        ldap_txn.end(conn, identifier, commit=not (refused or abort))
    except ldap.LDAPError as exc:
        if not connection.answered(exc):
            raise
        return False
    return not (refused or abort)


def transactions(index: int, args, url: str, dns: list[str], values: list[bytes], counts) -> None:
    """One process: --rounds transactions of --batch entries, as the request path sends them."""
    rng = random.Random(index)
    conn = connection.bind(LdapSettings(url=url, timeout_seconds=10.0))
    mine = dns if args.shared else dns[index::args.procs]
    committed = refused = 0
    try:
        for round_ in range(args.rounds):
            batch = rng.sample(mine, args.batch)
            csns = entry_csns(conn, batch) if args.assertion else [None] * len(batch)
            updates = []
            for dn, csn in zip(batch, csns):
                controls = [AssertionControl(True, f"(entryCSN={filter_value(csn)})")] if csn else []
                updates.append((dn, [(ldap.MOD_REPLACE, CERTIFICATE, [rng.choice(values)])], controls))
            abort = bool(args.abort_every) and round_ % args.abort_every == args.abort_every - 1
            if args.way == "project" and not abort and not args.one_at_a_time:
                ok = ldap_txn.modify_all(conn, updates, 10)
            else:
                pause = ldap_txn.SETTLE_SECONDS if args.way == "project" else args.end_pause / 1000
                ok = raw_transaction(conn, updates, one_at_a_time=args.one_at_a_time, abort=abort, pause=pause)
            committed, refused = committed + ok, refused + (not ok)
            if args.gap:
                time.sleep(args.gap / 1000)
    except ldap.LDAPError as exc:
        print(f"  transactions {index}: {type(exc).__name__} after {committed + refused} "
              f"({connection.translate(exc).detail})", flush=True)
    finally:
        with counts.get_lock():
            counts[0] += committed
            counts[1] += refused


def plain_modifies(index: int, args, url: str, dns: list[str], values: list[bytes], stop) -> None:
    """The outbox worker's way: one modify at a time, no transaction, on the same entries."""
    rng = random.Random(1000 + index)
    conn = connection.bind(LdapSettings(url=url, timeout_seconds=10.0))
    try:
        while not stop.is_set():
            conn.modify_ext_s(rng.choice(dns), [(ldap.MOD_REPLACE, CERTIFICATE, [rng.choice(values)])])
    except ldap.LDAPError:
        pass


def disable_overlays(slapd: PrivateSlapd) -> None:
    """olcDisabled on the database's overlays (OpenLDAP 2.5), over ldapi as the local root (cn=config)."""
    ldif = "".join(f"dn: olcOverlay={{{i}}}{name},olcDatabase={{1}}mdb,cn=config\nchangetype: modify\n"
                   "replace: olcDisabled\nolcDisabled: TRUE\n\n"
                   for i, name in enumerate(["memberof", "refint", "constraint"]))
    subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", slapd.ldapi_url], input=ldif, text=True,
                   check=True, capture_output=True)


def kernel_lines() -> list[str]:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if "slapd" in line]


def run(args) -> bool:
    """One run on a fresh slapd; True if slapd survived it."""
    workdir = Path(tempfile.mkdtemp(prefix="autoenroll-txn-"))
    slapd = PrivateSlapd(workdir / "slapd")
    slapd.start()
    before = set(kernel_lines())
    try:
        if not args.overlays:
            disable_overlays(slapd)
        uids = world.new_uids(args.users)
        slapd.load(world.users_ldif(uids, group=False))  # over LDAP: the overlays see them
        dns = [world.user_dn(uid) for uid in uids]
        values = certificates(16)
        ctx = multiprocessing.get_context("fork")
        counts, stop = ctx.Array("q", 2), ctx.Event()
        workers = [ctx.Process(target=transactions, args=(i, args, slapd.url, dns, values, counts))
                   for i in range(args.procs)]
        others = [ctx.Process(target=plain_modifies, args=(i, args, slapd.url, dns, values, stop))
                  for i in range(args.plain)]
        started = time.monotonic()
        for p in workers + others:
            p.start()
        for p in workers:
            p.join()
        stop.set()
        for p in others:
            p.join(30)
        alive = slapd.pid is not None
        wall = time.monotonic() - started
        print(f"{'alive' if alive else 'CRASHED'}: {counts[0]} committed, {counts[1]} refused in {wall:.1f} s",
              flush=True)
        for line in kernel_lines():
            if line not in before:
                print("  kernel:", line.strip(), flush=True)
        return alive
    finally:
        slapd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slapd_txn", description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="processes sending transactions at once")
    parser.add_argument("--rounds", type=int, default=2000, help="transactions per process")
    parser.add_argument("--batch", type=int, default=3, help="modifies per transaction")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--shared", action="store_true", help="every process modifies the same entries")
    parser.add_argument("--no-assert", dest="assertion", action="store_false",
                        help="no entryCSN assertion (and no read before the transaction)")
    parser.add_argument("--plain", type=int, default=0, help="processes sending plain modifies meanwhile")
    parser.add_argument("--abort-every", type=int, default=0, help="abort every Nth transaction")
    parser.add_argument("--one-at-a-time", action="store_true", help="wait for each modify's answer")
    parser.add_argument("--end-pause", type=float, default=0.0, metavar="MS",
                        help="--way raw: wait MS ms after the last modify's answer before ending the transaction")
    parser.add_argument("--gap", type=float, default=0.0, metavar="MS",
                        help="wait MS ms after each transaction (the same pause, not before the end)")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false",
                        help="memberOf, refint and constraint disabled (olcDisabled)")
    parser.add_argument("--way", choices=["project", "raw"], default="project",
                        help="project: ldap_txn.modify_all; raw: the end right after the answers")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"slapd {subprocess.run(['dpkg-query', '-W', '-f=${Version}', 'slapd'], capture_output=True, text=True).stdout}; "
          f"{vars(args)}", flush=True)
    survived = sum(run(args) for _ in range(args.runs))
    print(f"slapd survived {survived} of {args.runs} runs")
    return 0 if survived == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
