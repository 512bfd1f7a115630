"""The one real server platform of the benchmarks and the test suites.

`make_platform` writes the TOML (production defaults for everything not named: any setting as a keyword,
the `[ldap]` table, `[key_store]`, the role, `[targets.NAME]`, and raw TOML for what a keyword cannot say),
runs `autoenroll init`; `ServerPlatform` then runs `autoenroll serve` (gunicorn, TLS with client
certificates) and drives it through the real command lines. `Stack` adds what it runs on: a private slapd
(with the users of an LDIF) and, when asked, a private PostgreSQL. Also: the process tree of the server
(master, workers) for CPU and memory figures, and `eventually`, the one poller.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from directory_sync.slapd import PrivateSlapd, free_port

from .postgres import PrivatePostgres, database_url_for, new_database

if TYPE_CHECKING:
    import requests

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Knobs of the test suites, not settings: the server refuses AUTOENROLL_* names it does not know.
SUITE_VARIABLES = {"AUTOENROLL_FAULT_N", "AUTOENROLL_FUZZ_HTTP", "AUTOENROLL_FUZZ_APP"}
# What the end-to-end suites change from production defaults: an outbox worker that retries soon enough
# for a test to wait on it.
SUITE_SETTINGS: dict[str, object] = {"outbox_interval_seconds": 0.5}

T = TypeVar("T")


class CommandFailed(RuntimeError):
    """A command line (`autoenroll`, `autoenroll-agent`) that was expected to succeed exited non-zero."""


class ServerExited(RuntimeError):
    """`autoenroll serve` exited while starting; the message carries its log."""


def eventually(predicate: Callable[[], T | None], *, timeout: float = 30.0, step: float = 0.2,
               what: str = "the condition") -> T:
    """The first truthy value of `predicate()`, asked every `step` seconds for up to `timeout` seconds;
    AssertionError naming `what` if none came. The one poller of the suites and the benchmarks."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def stop_process_group(process: subprocess.Popen | None) -> None:
    """SIGTERM the server's process group (master and workers), SIGKILL it if it lingers."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def server_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SUITE_VARIABLES}
    return {**env, **(extra or {})}


def cli(*args: str, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """One of this virtualenv's command lines (`autoenroll`, `autoenroll-agent`, ...), its output as text;
    CommandFailed when `check` and it exits non-zero."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                            env=server_environment(env), timeout=timeout)
    if check and result.returncode != 0:
        raise CommandFailed(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def transaction(db_url: str) -> Iterator[Any]:
    """A session on a platform's database, read the way an auditor would; closed after."""
    from registration_app.store.db import Database
    database = Database(db_url)
    try:
        with database.transaction() as session:
            yield session
    finally:
        database.dispose()


# --- the TOML file ------------------------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_document(values: Mapping[str, object], *, raw: str = "", prefix: str = "") -> str:
    """`values` as TOML: its keys first, then `raw` (TOML text: its top-level keys land before any
    table), then a `[table]` for each mapping value, nested ones as `[table.sub]`. A None value is left out."""
    scalars = {k: v for k, v in values.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(lines) + ("\n" if lines else "")
    if raw:
        text += raw.strip("\n") + "\n"
    for key, table in tables.items():
        name = f"{prefix}{_toml_key(key)}"
        text += f"\n[{name}]\n" + toml_document(table, prefix=f"{name}.")
    return text


@dataclass
class ServerPlatform:
    data: Path
    config: Path
    url: str
    http_url: str
    ldap_url: str
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    ldap_ca_file: str = ""  # the CA that verifies the directory's certificate, when ldap_url is TLS
    ldap_start_tls: bool = False

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
    def agent_config(self) -> Path:
        return self.data / "agent.toml"

    @property
    def tls_ca(self) -> Path:
        return self.data / "tls-ca.pem"

    @property
    def log(self) -> Path:
        return self.data / "server.log"

    # --- the command lines, the database, the directory -------------------------------------------
    def autoenroll(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return cli("autoenroll", "--config", str(self.config), *args, check=check, env=self.env, timeout=timeout)

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return cli("autoenroll-agent", "--config", str(self.agent_config), *args, check=check, env=self.env)

    def settings(self):
        from registration_app.settings import load_settings
        return load_settings(self.config, environ=server_environment(self.env))

    def transaction(self):
        return transaction(self.db_url)

    def session(self, client_cert: bool = True) -> requests.Session:
        """An HTTPS session that trusts the platform's TLS CA, as the agent (its client certificate) or
        as anyone (`client_cert=False`)."""
        import requests
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.tls_ca)
        if client_cert:
            s.cert = (str(self.agent_cert), str(self.agent_key))
        return s

    def ldapsearch(self, *args: str) -> str:
        """ldapsearch (a mail client's view, anonymous) over the transport the server uses."""
        command = ["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", self.ldap_url,
                   *(["-ZZ"] if self.ldap_start_tls else []), *args]
        env = {**os.environ, "LDAPTLS_CACERT": self.ldap_ca_file, "LDAPTLS_REQCERT": "demand"} \
            if self.ldap_ca_file else None
        return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout

    # --- life cycle ----------------------------------------------------------------------------
    def start(self, workers: int | None = None, timeout: float = 60) -> None:
        """`autoenroll serve`, returned once /health answers and every worker is up (`workers`, if
        given, from now on overrides the TOML's). ServerExited with its log if it exits meanwhile."""
        import requests
        if workers is not None:
            self.env["AUTOENROLL_WORKERS"] = str(workers)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([str(BIN / "autoenroll"), "--config", str(self.config), "serve"],
                                            stdout=out, stderr=subprocess.STDOUT, env=server_environment(self.env),
                                            start_new_session=True)
        process, wanted, session = self.process, int(self.settings().workers), self.session(client_cert=False)

        def serving() -> bool:
            if process.poll() is not None:
                raise ServerExited(f"server exited:\n{self.log.read_text()}")
            try:
                answered = session.get(self.url + "/health", timeout=2).status_code in (200, 503)
            except requests.RequestException:
                return False
            return answered and len(self.worker_pids()) >= wanted

        try:
            eventually(serving, timeout=timeout, step=0.1, what="the server to start")
        except AssertionError:
            raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}") from None

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None

    def restart(self, **env: str) -> None:
        self.stop()
        self.env.update(env)
        self.start()

    @contextmanager
    def running(self, workers: int | None = None) -> Iterator[ServerPlatform]:
        """Started for the block, and stopped (master and workers) however the block ends."""
        try:
            self.start(workers)
            yield self
        finally:
            self.stop()

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
        wanted = count or int(self.settings().workers)

        def workers() -> list[int] | None:
            pids = self.worker_pids()
            return pids if len(pids) >= wanted else None

        return eventually(workers, timeout=timeout, step=0.05, what=f"{wanted} workers")

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


def configure(data: Path, ldap_url: str, *, ldap: Mapping[str, object] | None = None,
              key_store: Mapping[str, object] | None = None, role: str | None = None,
              targets: Mapping[str, Mapping[str, object]] | None = None, extra_toml: str = "",
              env: Mapping[str, str] | None = None, **settings: object) -> ServerPlatform:
    """Write `data`/autoenroll.toml and return its platform, not initialised (`make_platform` runs init).

    `settings`: top-level settings (a None value leaves the key out, e.g. `http_url=None` lets init choose
    it); `ldap`: the `[ldap]` table beyond `url` (bind_dn, ca_file, start_tls, preset, ...); `key_store`:
    the `[key_store]` table; `role`: all (default), ra, ca or kra; `targets`: `[targets.NAME]` tables;
    `extra_toml`: TOML text for what the keywords do not say. The database is the run's PostgreSQL when
    there is one (bench/postgres.py `database_url_for`), else the SQLite file in `data`."""
    data.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    database_url = settings.pop("database_url", None) or database_url_for()
    values: dict[str, object] = {
        "data_dir": ".",
        "database_url": database_url,
        "role": role,
        "public_url": f"https://localhost:{port}",
        "http_url": f"http://127.0.0.1:{http_port}",
        "bind": f"127.0.0.1:{port}",
        "http_bind": f"127.0.0.1:{http_port}",
        **settings,
    }
    ldap_table = {"url": ldap_url, "timeout_seconds": 2.0, **(ldap or {})}
    tables: dict[str, object] = {"ldap": ldap_table}
    if key_store:
        tables["key_store"] = dict(key_store)
    if targets:
        tables["targets"] = {name: dict(table) for name, table in targets.items()}
    config = data / "autoenroll.toml"
    config.write_text(toml_document({**values, **tables}, raw=extra_toml))
    http_bind = str(values.get("http_bind") or "")
    return ServerPlatform(data=data, config=config, url=str(values["public_url"]),
                          http_url=str(values.get("http_url") or f"http://{http_bind}"),
                          ldap_url=str(ldap_table["url"]), env=dict(env or {}),
                          ldap_ca_file=str(ldap_table.get("ca_file", "")),
                          ldap_start_tls=bool(ldap_table.get("start_tls", False)))


def make_platform(data: Path, ldap_url: str, *, init_options: tuple[str, ...] = (),
                  **options: Any) -> ServerPlatform:
    """`configure` (every keyword is its), then `autoenroll init` with `init_options` (e.g. the token of
    bench/softhsm.py init_options)."""
    platform = configure(data, ldap_url, **options)
    platform.autoenroll("init", *init_options)
    return platform


class Stack:
    """A private slapd (base entries, then `ldif` loaded with slapadd), a private PostgreSQL server with
    a database of the platform's own when `postgres`, and a server platform on them (`make_platform`
    with `platform_options`), started unless `start=False`. `close` stops all of it."""

    def __init__(self, folder: Path, *, ldif: str = "", postgres: bool = False, start: bool = True,
                 **platform_options: Any) -> None:
        self.slapd = PrivateSlapd(folder / "slapd")
        self.postgres: PrivatePostgres | None = None
        self.platform: ServerPlatform
        try:
            self.slapd.start()
            if ldif:
                self.slapd.bulk_load(ldif)
            if postgres:
                self.postgres = PrivatePostgres()
                self.postgres.start()
                platform_options["database_url"] = new_database(self.postgres.url)
            self.platform = make_platform(folder / "server", self.slapd.url, **platform_options)
            if start:
                self.platform.start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            platform = getattr(self, "platform", None)  # None when the stack failed before it was made
            if platform is not None:
                platform.stop()
        finally:
            try:
                self.slapd.stop()
            finally:
                if self.postgres is not None:
                    self.postgres.stop()
