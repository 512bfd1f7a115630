"""Concurrent agents against the running server: enrollments/s, latency percentiles, CPU on both sides."""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from .client import AgentConnection
from .platform import CLK_TCK, children, peak_rss_mb, process_cpu


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class LoadResult:
    requests: int
    ok: int
    statuses: dict
    wall: float
    latencies: list[float] = field(repr=False, default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    slapd_cpu: float = 0.0
    server_sys_cpu: float = 0.0  # the part of server_cpu spent in the kernel
    worker_peak_rss_mb: list[float] = field(default_factory=list)
    # Each agent's mean latency (s): their spread shows how unevenly the keep-alive connections fell on
    # the workers (each accepts the connections it wins, and keeps them).
    agent_means: list[float] = field(default_factory=list)
    # Per gunicorn worker: CPU seconds over the run, and the agents' connections it holds (the split of
    # the keep-alive connections decides how evenly the two processes, each on its own GIL, are loaded).
    worker_cpu: list[float] = field(default_factory=list)
    worker_connections: list[int] = field(default_factory=list)
    # CPU seconds the whole machine spent busy over the run (/proc/stat): what the server, slapd and the
    # agents did not use went to other processes or stayed idle.
    machine_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    @property
    def server_cores(self) -> float:
        return self.server_cpu / self.wall if self.wall else 0.0

    @property
    def client_cpu_share(self) -> float:
        total = self.client_cpu + self.server_cpu + self.slapd_cpu
        return self.client_cpu / total if total else 0.0

    def summary(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "statuses": self.statuses,
                "wall_s": round(self.wall, 3), "rate_per_s": round(self.rate, 1),
                "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1),
                "client_cpu_s": round(self.client_cpu, 2), "server_cpu_s": round(self.server_cpu, 2),
                "slapd_cpu_s": round(self.slapd_cpu, 2), "server_sys_cpu_s": round(self.server_sys_cpu, 2),
                "server_cpu_ms_per_request": round(1000 * self.server_cpu / self.ok, 2) if self.ok else None,
                "server_cores_used": round(self.server_cores, 2),
                "client_cpu_share": round(self.client_cpu_share, 3),
                "agent_mean_ms": sorted(round(1000 * m, 1) for m in self.agent_means),
                "worker_cores_used": [round(c / self.wall, 2) if self.wall else 0.0 for c in self.worker_cpu],
                "worker_connections": self.worker_connections,
                "machine_cpu_s": round(self.machine_cpu, 2),
                "worker_peak_rss_mb": [round(m, 1) for m in self.worker_peak_rss_mb]}


def run_load(platform, users: list, payload: dict, *, agents: int = 8, slapd_pid: int | None = None) -> LoadResult:
    """Every user enrolls once with `payload`; `agents` threads, each with its own keep-alive mTLS
    connection, opened (TLS handshake) before the clock starts."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for user in users:
        work.put(user)
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()
    ready = threading.Barrier(agents + 1)
    errors: list[BaseException] = []
    agent_means: list[float] = []

    def agent() -> None:
        conn = AgentConnection.for_platform(platform)
        mine: list[float] = []
        try:
            conn.nonce()  # handshake + first request outside the measured window
            ready.wait()
            while True:
                try:
                    user = work.get_nowait()
                except queue.Empty:
                    return
                reply = conn.enroll(user, payload)
                with lock:
                    statuses[reply.status] += 1
                    if reply.status == 201:
                        latencies.append(reply.seconds)
                        mine.append(reply.seconds)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            try:
                ready.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            conn.close()
            if mine:
                with lock:
                    agent_means.append(sum(mine) / len(mine))

    threads = [threading.Thread(target=agent, daemon=True) for _ in range(agents)]
    for t in threads:
        t.start()
    ready.wait()
    workers = platform.worker_pids()
    port = urllib.parse.urlsplit(platform.url).port
    connections = [len(established_sockets(pid, port)) for pid in workers]
    worker0 = [process_tree_cpu(pid) for pid in workers]
    cpu0, (user0, sys0) = time.process_time(), platform.cpu_split()
    slapd0 = process_cpu(slapd_pid) if slapd_pid else 0.0
    machine0 = machine_busy_cpu()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    machine = machine_busy_cpu() - machine0
    user1, sys1 = platform.cpu_split()
    result = LoadResult(requests=len(users), ok=statuses.get(201, 0), statuses=dict(statuses), wall=wall,
                        latencies=latencies, client_cpu=time.process_time() - cpu0,
                        server_cpu=(user1 + sys1) - (user0 + sys0), server_sys_cpu=sys1 - sys0,
                        slapd_cpu=(process_cpu(slapd_pid) - slapd0) if slapd_pid else 0.0,
                        worker_peak_rss_mb=[peak_rss_mb(pid) for pid in platform.worker_pids()],
                        agent_means=agent_means,
                        worker_cpu=[process_tree_cpu(pid) - c for pid, c in zip(workers, worker0)],
                        worker_connections=connections, machine_cpu=machine)
    if errors:
        raise RuntimeError(f"{len(errors)} agent thread(s) failed: {errors[0]!r}") from errors[0]
    return result


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a worker and its helper processes so far."""
    return process_cpu(pid) + sum(process_cpu(child) for child in children(pid))


def established_sockets(pid: int, local_port: int | None) -> set[int]:
    """The inodes of the established TCP sockets on `local_port` a process holds: the connections it
    accepted."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == local_port:  # ESTABLISHED
                        established.add(int(fields[9]))
        except OSError:
            continue
    mine = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in established:
                    mine.add(inode)
    except OSError:
        pass
    return mine


def wait_idle(platform, *, quiet_fraction: float = 0.05, window: float = 0.5, timeout: float = 120) -> float:
    """Wait until the server's processes use less than `quiet_fraction` of a core (e.g. the RSA key
    pools are full). Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = platform.cpu_seconds()
        time.sleep(window)
        if platform.cpu_seconds() - before < quiet_fraction * window:
            return time.monotonic() - started
    return time.monotonic() - started


def machine_busy_cpu() -> float:
    """CPU seconds all cores of this machine have been busy since boot (/proc/stat: everything but
    idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / CLK_TCK  # guest time is already counted in user


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
