"""A real server platform for benchmarks and the fault/adversarial suites.

`autoenroll init` + `autoenroll serve` (gunicorn, TLS with client certificates) against a private slapd,
with any setting given as a keyword (written into the TOML file, so production defaults stay in force for
everything not named). Also: the process tree of the server (master, workers) for CPU and memory figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from directory_sync.slapd import free_port

from .postgres import database_url_for

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Knobs of the test suites, not settings: the server refuses AUTOENROLL_* names it does not know.
SUITE_VARIABLES = {"AUTOENROLL_FAULT_N", "AUTOENROLL_FUZZ_HTTP", "AUTOENROLL_FUZZ_APP"}


def stop_process_group(process: subprocess.Popen | None) -> None:
    """SIGTERM the server's process group (master and workers), SIGKILL it if it lingers."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def server_environment(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SUITE_VARIABLES}
    return {**env, **(extra or {})}


def run_cli(*args: str, env: dict | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                            env=server_environment(env), timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ServerPlatform:
    data: Path
    config: Path
    url: str
    http_url: str
    ldap_url: str
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    # --- files -------------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data / "autoenroll.db"

    @property
    def db_url(self) -> str:
        """The platform's database: its SQLite file, or the PostgreSQL database its TOML names."""
        return self.settings().db_url

    @property
    def passphrase(self) -> bytes:
        return (self.data / "passphrase").read_bytes().strip()

    @property
    def agent_cert(self) -> Path:
        return self.data / "agent.pem"

    @property
    def agent_key(self) -> Path:
        return self.data / "agent.key"

    @property
    def tls_ca(self) -> Path:
        return self.data / "tls-ca.pem"

    @property
    def log(self) -> Path:
        return self.data / "server.log"

    def autoenroll(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_cli("autoenroll", "--config", str(self.config), *args, check=check, env=self.env,
                       timeout=timeout)

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli("autoenroll-agent", "--config", str(self.data / "agent.toml"), *args, check=check,
                       env=self.env)

    def settings(self):
        from registration_app.settings import load_settings
        return load_settings(self.config, environ=server_environment(self.env))

    # --- life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        import requests
        env = server_environment(self.env)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([str(BIN / "autoenroll"), "--config", str(self.config), "serve"],
                                            stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        session = requests.Session()
        session.trust_env = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if session.get(self.url + "/health", timeout=2, verify=str(self.tls_ca)).status_code in (200, 503):
                    if len(self.worker_pids()) >= int(self.settings().workers):
                        return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None

    def restart(self, **env: str) -> None:
        self.stop()
        self.env.update(env)
        self.start()

    # --- the process tree ----------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """gunicorn workers: the children of the master."""
        if self.process is None:
            return []
        return children(self.process.pid)

    def server_pids(self) -> list[int]:
        """The master, its workers and their helper processes (PKCS#12 builders): all server CPU."""
        if self.process is None:
            return []
        workers = self.worker_pids()
        return [self.process.pid, *workers, *(h for w in workers for h in children(w))]

    def wait_workers(self, count: int | None = None, timeout: float = 30) -> list[int]:
        """The worker pids once `count` (default: the configured number) are up and answering."""
        count = count or int(self.settings().workers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) >= count:
                return pids
            time.sleep(0.05)
        raise RuntimeError(f"only {len(self.worker_pids())} of {count} workers after {timeout} s")

    def cpu_seconds(self) -> float:
        """CPU (user + system) of the master, the live workers and their helpers so far."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the master, the live workers and their helpers so far."""
        splits = [process_cpu_split(pid) for pid in self.server_pids()]
        return sum(u for u, _ in splits), sum(s for _, s in splits)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def process_cpu(pid: int) -> float:
    return sum(process_cpu_split(pid))


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set size) of a process, in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_platform(data: Path, ldap_url: str, *, env: dict | None = None, init_options: tuple[str, ...] = (),
                  **settings: object) -> ServerPlatform:
    """Write the TOML (production defaults unless named in `settings`), run `autoenroll init` (with
    `init_options`, e.g. bench/softhsm.py init_options)."""
    data.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    database_url = settings.pop("database_url", None) or database_url_for()
    values = {
        "data_dir": ".",
        **({"database_url": database_url} if database_url else {}),
        "public_url": f"https://localhost:{port}",
        "http_url": f"http://127.0.0.1:{http_port}",
        "bind": f"127.0.0.1:{port}",
        "http_bind": f"127.0.0.1:{http_port}",
        **settings,
    }
    ldap = {"url": ldap_url, "timeout_seconds": 2.0, **(values.pop("ldap", None) or {})}
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    lines += ["", "[ldap]"] + [f"{key} = {_toml_value(value)}" for key, value in ldap.items()]
    config = data / "autoenroll.toml"
    config.write_text("\n".join(lines) + "\n")
    platform = ServerPlatform(data=data, config=config, url=f"https://localhost:{port}",
                              http_url=f"http://127.0.0.1:{http_port}", ldap_url=ldap_url, env=dict(env or {}))
    platform.autoenroll("init", *init_options)
    return platform
