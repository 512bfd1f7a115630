"""`python -m bench.threads`: where the server's CPU per enrollment goes, thread by thread, under the load
of `python -m bench --only server` (1) (real gunicorn over mTLS, real slapd, 8 agents): user and kernel
CPU and voluntary / involuntary context switches per enrollment of each kind of thread of the workers
(their request threads, the poller, the outbox's batching thread, ...), from /proc, which counts what a
sampling profiler cannot tell apart (a thread waiting for the GIL or in a blocking C call looks busy to
py-spy). `--strace` adds `strace -c -f` of one worker for the same load: syscalls per enrollment.

Run it against another checkout to compare: `PYTHONPATH=<checkout> python -m bench.threads`, before
and after in turns (the machine is shared: PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from . import load, world
from .platform import Stack

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """tid: (user ticks, system ticks, voluntary switches, involuntary switches) of each thread of `pid`."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the thread ended meanwhile
            continue
        found[int(tid)] = (int(fields[11]), int(fields[12]), int(status["voluntary_ctxt_switches"]),
                           int(status["nonvoluntary_ctxt_switches"]))
    return found


def _names(pid: int) -> dict[int, str]:
    """tid: Python thread name, from `py-spy dump` when it is there (Python does not name OS threads)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        out = subprocess.run([exe, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():  # Thread 1234 (idle): "MainThread"
        if line.startswith("Thread ") and '"' in line:
            tid = int(line.split()[1], 0)
            names[tid] = line.split('"')[1].rstrip("_0123456789")
    return names


def measure(workdir: Path, n: int, agents: int, strace: bool) -> dict:
    warmup = 2 * agents
    uids = world.new_uids(warmup + n)
    with Stack(workdir, ldif=world.users_ldif(uids)) as stack:
        platform = stack.platform
        users = world.Minter(platform.data, platform.passphrase).users(uids)
        payload = {"profile": "smime-encryption-ec", "password": "bench-password-0123"}
        load.run_load(platform, users[:warmup], payload, agents=agents)
        load.wait_idle(platform)
        pids = platform.worker_pids()
        tracer = None
        if strace and shutil.which("strace"):
            tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pids[0]), "-o", str(workdir / "strace.txt")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {pid: _threads(pid) for pid in pids}
        result = load.run_load(platform, users[warmup:], payload, agents=agents, slapd_pid=stack.slapd.pid)
        after = {pid: _threads(pid) for pid in pids}
        names = {pid: _names(pid) for pid in pids}
        if tracer is not None:
            tracer.send_signal(2)
            tracer.wait(30)
        kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
        for pid in pids:
            for tid, (user, system, voluntary, involuntary) in after[pid].items():
                b = before[pid].get(tid, (0, 0, 0, 0))
                kind = kinds[names[pid].get(tid, "?")]
                kind[0] += 1
                kind[1] += (user - b[0]) / CLK_TCK
                kind[2] += (system - b[1]) / CLK_TCK
                kind[3] += voluntary - b[2]
                kind[4] += involuntary - b[3]
        ok = max(result.ok, 1)
        report = {"enrollments": result.ok, "rate_per_s": round(result.rate, 1),
                  "server_cpu_ms_per_enrollment": round(1000 * result.server_cpu / ok, 2),
                  "server_sys_ms_per_enrollment": round(1000 * result.server_sys_cpu / ok, 2),
                  "threads": {name: {"threads": int(k[0]), "user_ms": round(1000 * k[1] / ok, 3),
                                     "sys_ms": round(1000 * k[2] / ok, 3), "voluntary_switches": round(k[3] / ok, 2),
                                     "involuntary_switches": round(k[4] / ok, 2)}
                              for name, k in sorted(kinds.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))}}
        if tracer is not None and (workdir / "strace.txt").exists():
            # one worker of two: about half the enrollments
            report["strace_worker0"] = (workdir / "strace.txt").read_text()
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=600, help="enrollments")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--strace", action="store_true", help="also strace -c one worker (slows it down)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    try:
        report = measure(workdir, args.n, args.agents, args.strace)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{report['enrollments']} enrollments, {report['rate_per_s']}/s; server CPU "
          f"{report['server_cpu_ms_per_enrollment']} ms per enrollment (kernel {report['server_sys_ms_per_enrollment']})")
    print(f"{'thread':<26}{'n':>3}{'user ms':>10}{'sys ms':>9}{'vol cs':>9}{'invol cs':>10}   (per enrollment)")
    for name, t in report["threads"].items():
        print(f"{name:<26}{t['threads']:>3}{t['user_ms']:>10.3f}{t['sys_ms']:>9.3f}{t['voluntary_switches']:>9.2f}"
              f"{t['involuntary_switches']:>10.2f}")
    if "strace_worker0" in report:
        print("\nstrace -c -f of worker 0 (about half the enrollments):\n" + report["strace_worker0"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
