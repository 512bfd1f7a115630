"""The gunicorn workers share the agents' kept-alive connections evenly (web/worker.py `_Shares`).

Against the real server (2 workers, TLS): agents open their connections one after the other and keep
them; each worker ends up holding half of them, and each connection still answers. Before, whichever
worker won the accept kept the connection, and 8 agents' connections fell 6/2 or 5/3 in half the
benchmark runs (PERFORMANCE.md).
"""

from __future__ import annotations

import os

from bench.client import AgentConnection

AGENTS = 16


def _server_side_ports(pid: int, server_port: int) -> set[int]:
    """The remote ports of the established connections on `server_port` that process `pid` holds."""
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == server_port:
                    by_inode[inode] = int(remote.rsplit(":", 1)[1], 16)
    ports = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in by_inode:
            ports.add(by_inode[int(target[8:-1])])
    return ports


def test_agents_kept_alive_connections_are_shared_evenly_by_the_workers(platform):
    workers = platform.worker_pids()
    assert len(workers) == 2
    agents = []
    try:
        for _ in range(AGENTS):  # one after the other: each connection is open (and answered) before the next
            agent = AgentConnection.for_platform(platform)
            agent.nonce()
            agents.append(agent)
        ours = {agent.conn.sock.getsockname()[1] for agent in agents}
        held = [len(_server_side_ports(pid, agents[0].port) & ours) for pid in workers]
        assert sum(held) == AGENTS
        assert max(held) - min(held) <= 2, held
        for agent in agents:  # every kept-alive connection still answers, on whichever worker holds it
            agent.resend_on_reset = False  # on the same connection: a reconnect would fail the test
            agent.nonce()
        assert {agent.conn.sock.getsockname()[1] for agent in agents} == ours
    finally:
        for agent in agents:
            agent.close()
