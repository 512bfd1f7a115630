"""A running server platform for end-to-end tests: `autoenroll init` + `autoenroll serve` (gunicorn, TLS,
client certificates) against a private slapd, driven through the real command lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.platform import stop_process_group
from directory_sync.slapd import free_port

BIN = Path(sys.executable).parent


def cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def transaction(db_url: str):
    """A session on a platform's database, read the way an auditor would; closed after."""
    from registration_app.store.db import Database
    database = Database(db_url)
    try:
        with database.transaction() as session:
            yield session
    finally:
        database.dispose()


@dataclass
class Platform:
    data: Path
    config: Path
    url: str
    http_url: str
    ldap_url: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    ldap_ca_file: str = ""  # the CA that verifies slapd's certificate, when ldap_url is TLS
    ldap_start_tls: bool = False

    def ldapsearch(self, *args: str) -> str:
        """ldapsearch (a mail client's view, anonymous) over the transport the server uses."""
        command = ["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", self.ldap_url,
                   *(["-ZZ"] if self.ldap_start_tls else []), *args]
        env = {**os.environ, "LDAPTLS_CACERT": self.ldap_ca_file, "LDAPTLS_REQCERT": "demand"} \
            if self.ldap_ca_file else None
        return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout

    @property
    def agent_config(self) -> Path:
        return self.data / "agent.toml"

    @property
    def db_url(self) -> str:
        """Its SQLite file, or the PostgreSQL database of `--database=postgresql`."""
        from registration_app.settings import load_settings
        return load_settings(self.config).db_url

    def transaction(self):
        return transaction(self.db_url)

    def autoenroll(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return cli("autoenroll", "--config", str(self.config), *args, check=check)

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return cli("autoenroll-agent", "--config", str(self.agent_config), *args, check=check)

    def session(self, client_cert: bool = True) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.data / "tls-ca.pem")
        if client_cert:
            s.cert = (str(self.data / "agent.pem"), str(self.data / "agent.key"))
        return s

    def start(self, workers: int = 2) -> None:
        self.log = self.data / "server.log"
        env = {**os.environ, "AUTOENROLL_WORKERS": str(workers)}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([str(BIN / "autoenroll"), "--config", str(self.config), "serve"],
                                            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log.read_text()}")
            try:
                if self.session(client_cert=False).get(self.url + "/health", timeout=2).status_code in (200, 503):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        stop_process_group(self.process)

    @contextmanager
    def running(self, workers: int = 2):
        """Started for the block, and stopped (master and workers) however the block ends."""
        try:
            self.start(workers)
            yield self
        finally:
            self.stop()


def make_platform(data: Path, ldap_url: str, *, extra: str = "", ldap_ca_file: str = "",
                  ldap_start_tls: bool = False, init_options: tuple[str, ...] = ()) -> Platform:
    """`init_options`: more options of `autoenroll init`, e.g. the token of tests/softhsm.py key_store_options."""
    from bench.postgres import database_url_for
    port, http_port = free_port(), free_port()
    database_url = database_url_for()
    config = data / "autoenroll.toml"
    config.write_text(f"""
data_dir = "."
{f'database_url = "{database_url}"' if database_url else ""}
public_url = "https://localhost:{port}"
http_url = "http://127.0.0.1:{http_port}"
bind = "127.0.0.1:{port}"
http_bind = "127.0.0.1:{http_port}"
pkcs12_iterations = 2048
outbox_interval_seconds = 0.5
{extra}
[ldap]
url = "{ldap_url}"
timeout_seconds = 2.0
{f'ca_file = "{ldap_ca_file}"' if ldap_ca_file else ""}
{"start_tls = true" if ldap_start_tls else ""}
""")
    platform = Platform(data=data, config=config, url=f"https://localhost:{port}",
                        http_url=f"http://127.0.0.1:{http_port}", ldap_url=ldap_url,
                        ldap_ca_file=ldap_ca_file, ldap_start_tls=ldap_start_tls)
    platform.autoenroll("init", *init_options)
    return platform
