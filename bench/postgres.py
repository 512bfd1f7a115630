"""A private PostgreSQL server on loopback for the suites (`pytest --database=postgresql`), like the private
slapd: Debian's binaries, a cluster made by initdb in a temporary folder, trust authentication on
127.0.0.1 only, stopped (and removed) at the end.

Every platform under test then gets a database of its own on it (`database_url_for`), so that two
platforms never see each other's certificates, exactly as with their SQLite files.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from directory_sync.slapd import free_port

# The server the platforms under test use: set by tests/conftest.py for `--database=postgresql`.
ENV = "PYTEST_AUTOENROLL_POSTGRES"  # not AUTOENROLL_*: the server refuses names it does not know
USER = "autoenroll"


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bin = bin_dir
        self.port = free_port()
        # Not under pytest's folders: PostgreSQL refuses to run as root, and its own user must reach this one.
        self.folder = Path(tempfile.mkdtemp(prefix="autoenroll-pg-"))
        self.data = self.folder / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        """The server, without a database name: `database_url_for` appends one."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        self._start()

    def _start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w",
                  "-t", "60", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c max_connections=300 -c fsync=on", "start")

    def restart(self, down_seconds: float = 1.0) -> None:
        """Stop the server (fast: every connection is cut), wait, start it again on the same port."""
        import time
        self.halt()
        time.sleep(down_seconds)
        self.resume()

    def halt(self) -> None:
        """Stop the server (fast: every connection is cut), keeping its data for `resume`."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server `halt` stopped, on the same port."""
        self._start()

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (the first line of postmaster.pid), while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> float:
        """CPU of the postmaster and every backend and helper process it forked."""
        from .platform import children, process_cpu
        pid = self.pid
        return sum(process_cpu(p) for p in [pid, *children(pid)]) if pid else 0.0

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def new_database(server_url: str) -> str:
    """CREATE DATABASE on the server at `server_url`; the URL of the new, empty database."""
    import psycopg

    name = "ae_" + uuid.uuid4().hex[:16]
    with psycopg.connect(server_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


def database_url_for() -> str | None:
    """A database of its own for a platform under test: on the suite's PostgreSQL server when there is
    one, else None (the platform's SQLite file in its data folder, the default)."""
    server = os.environ.get(ENV)
    return new_database(server) if server else None
