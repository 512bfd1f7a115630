"""`python -m bench.inline_publication`: the request path's publication alone, with every request
publishing at the same moment: THREADS threads call `RegistrationAuthority.publish_now` for enrollments
issued beforehand (real slapd, real SQLite, in this process), one publication per request
(`[ldap] inline_transactions = false`) against the group commit (directory_sync/inline.py), in turns.

In the whole server (`python -m bench`) the SQLite writer lock lets issuances out one at a time, so
their publications seldom meet; this shows what the group commit does when they do. It prints
publications/s, each call's p50/p99 and slapd's CPU per publication (PERFORMANCE.md, "LDAP").

`--costs N` first prints what one enrollment asks of LDAP, one request at a time: the operations
(searches, modifies) and the client CPU of entitlement (`find_user`, `groups_of`) and of the publication
(`publish_now`), with the entry the entitlement search read and without it (then the publication reads
the entry itself), and `--rounds 0` skips the turns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

from directory_sync.slapd import PrivateSlapd

from . import world
from .platform import make_platform


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LdapCounter:
    """Counts python-ldap's requests sent by this process (every LDAP operation goes through these)."""

    def __init__(self) -> None:
        from ldap.ldapobject import SimpleLDAPObject
        self.counts: dict[str, int] = {}
        for name in ("search_ext", "modify_ext", "extop"):
            original = getattr(SimpleLDAPObject, name)

            def counted(obj, *args, _name=name, _original=original, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _original(obj, *args, **kwargs)

            setattr(SimpleLDAPObject, name, counted)

    @contextlib.contextmanager
    def measure(self, totals: dict[str, float]):
        """Adds this block's LDAP requests and its thread's CPU seconds to `totals`."""
        before, cpu = dict(self.counts), time.thread_time()
        yield
        totals["cpu"] = totals.get("cpu", 0.0) + time.thread_time() - cpu
        for name, count in self.counts.items():
            totals[name] = totals.get(name, 0) + count - before.get(name, 0)


def costs(services, uids: list[str], counter: LdapCounter) -> None:
    """One enrollment at a time: LDAP requests and client CPU of entitlement and of the publication,
    with the entitlement's entry (as the request path does) and without it (the publication reads it)."""
    from registration_app.authorities.key_authority import Decision, IssueRequest
    profile = services.settings.profiles["smime-encryption-ec"]
    half = len(uids) // 2
    for label, chunk, give_entry in (("with the entry entitlement read", uids[:half], True),
                                     ("reading the entry again", uids[half:], False)):
        entitlement: dict[str, float] = {}
        publication: dict[str, float] = {}
        for uid in chunk:
            with counter.measure(entitlement):
                user = services.directory.find_user(f"{uid}@example.org")
                services.directory.groups_of(user)
            issued = services.key_authority.issue(
                IssueRequest(user=user, profile=profile, actor="bench", password="bench-password-0123"),
                decision=Decision(publish_inline=True))
            with counter.measure(publication):
                assert services.ra.publish_now(user.dn, issued, entry=user if give_entry else None)
        services.publisher.completions.flush(10)
        n = len(chunk)

        def line(totals: dict[str, float]) -> str:
            ops = ", ".join(f"{totals.get(k, 0) / n:.2f} {k.split('_')[0]}" for k in ("search_ext", "modify_ext"))
            return f"{ops}; client CPU {1000 * totals['cpu'] / n:.3f} ms"

        print(f"{label:32s} entitlement: {line(entitlement)} | publication: {line(publication)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="publications per turn")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each way")
    parser.add_argument("--costs", type=int, default=0, metavar="N",
                        help="first, N enrollments one at a time: LDAP requests and client CPU of each part")
    args = parser.parse_args()
    counter = LdapCounter() if args.costs else None
    from registration_app.authorities.key_authority import Decision, IssueRequest
    from registration_app.wiring import build_services

    workdir = Path(tempfile.mkdtemp(prefix="autoenroll-inline-"))
    slapd = PrivateSlapd(workdir / "slapd")
    slapd.start()
    try:
        uids = world.new_uids(args.n * 2 * args.rounds + args.costs)
        slapd.bulk_load(world.users_ldif(uids))
        # On here, off by default: slapd 2.5.13 crashes under concurrent transactions of several
        # processes (PERFORMANCE.md); this measures one process's threads.
        platform = make_platform(workdir / "server", slapd.url, ldap={"inline_transactions": True})
        services = build_services(platform.settings(), run_migrations=False)
        profile = services.settings.profiles["smime-encryption-ec"]
        group_commit = services.publisher.inline
        if group_commit is None:
            raise SystemExit("this directory offers no transactions: nothing to compare")
        if counter is not None:
            costs(services, uids[-args.costs:], counter)
        todo = iter(uids)

        def issued_now(count: int) -> list:
            out = []
            for uid in [next(todo) for _ in range(count)]:
                user = services.directory.find_user(f"{uid}@example.org")
                out.append((user, services.key_authority.issue(
                    IssueRequest(user=user, profile=profile, actor="bench", password="bench-password-0123"),
                    decision=Decision(publish_inline=True))))
            services.publisher.completions.flush(10)
            return out

        def turn(way: str) -> None:
            services.publisher.inline = group_commit if way == "group commit" else None
            pending: queue.Queue = queue.Queue()
            for pair in issued_now(args.n):
                pending.put(pair)
            latencies: list[float] = []
            published: list[bool] = []

            def publish() -> None:
                while True:
                    try:
                        user, issued = pending.get_nowait()
                    except queue.Empty:
                        return
                    started = time.perf_counter()
                    answer = services.ra.publish_now(user.dn, issued, entry=user)
                    latencies.append(time.perf_counter() - started)
                    published.append(answer)

            batched, slapd_cpu, started = group_commit.batched_users, _cpu_seconds(slapd.pid), time.perf_counter()
            threads = [threading.Thread(target=publish) for _ in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall, slapd_cpu = time.perf_counter() - started, _cpu_seconds(slapd.pid) - slapd_cpu
            latencies.sort()
            print(f"{way:22s} {args.n / wall:7.0f} publications/s, p50 {1000 * latencies[len(latencies) // 2]:5.1f} ms, "
                  f"p99 {1000 * latencies[int(len(latencies) * 0.99)]:5.1f} ms, slapd CPU "
                  f"{1000 * slapd_cpu / args.n:.3f} ms each; published {sum(published)}/{args.n}, "
                  f"{group_commit.batched_users - batched} in transactions", flush=True)

        print(f"{args.threads} threads publishing at once, {args.n} publications per turn")
        for _ in range(args.rounds):
            turn("one per request")
            turn("group commit")
        services.close()
    finally:
        slapd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
