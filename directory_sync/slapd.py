"""A private slapd in a folder, built from ldap_schema/: for `make run`, the tests and the benchmarks.

Layout of the folder: config/ (cn=config, slapd.d), db/ (mdb), ldapi (socket), slapd.pid, slapd.log,
port and ldaps-port (kept so that a restart reuses them), admin.pw (cn=admin's password, mode 0600).

With `tls=SlapdTls(...)` the instance also serves ldaps:// on a second loopback port and StartTLS on the
ldap:// one, with the certificate and key given (the tests issue them), and accepts TLS client
certificates issued by `client_ca_file` for SASL EXTERNAL (the identity is the certificate's subject DN).

    python -m directory_sync.slapd start --dir var/slapd [--port 3890] [--demo]
    python -m directory_sync.slapd stop --dir var/slapd
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from directory_sync.config import DEV_SERVICE_PASSWORD, SUFFIX, LdapSettings


def _schema_dir() -> Path:
    """ldap_schema/ beside this package in a checkout, or the `ldap_schema` package of an installed wheel."""
    beside = Path(__file__).resolve().parent.parent / "ldap_schema"
    if (beside / "config.ldif.in").exists():
        return beside
    from importlib.resources import files
    return Path(str(files("ldap_schema")))


SCHEMA_DIR = _schema_dir()
SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPADD = "/usr/bin/ldapadd"
SERVICE_DN = f"cn=autoenroll,ou=services,{SUFFIX}"
CA_DN = f"cn=Autoenroll CA,ou=services,{SUFFIX}"
ADMIN_DN = f"cn=admin,{SUFFIX}"


class SlapdError(RuntimeError):
    """The private slapd could not be set up or started (a dev/test tool failure, not a request error)."""


def ssha(password: str) -> str:
    """The {SSHA} form slapd understands (what `slappasswd` prints), without needing slappasswd."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SlapdTls:
    """The server certificate (PEM, with any intermediates after it) and key slapd presents, and the CA
    whose client certificates it accepts (SASL EXTERNAL)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path


class PrivateSlapd:
    def __init__(self, workdir: Path, port: int | None = None,
                 service_password: str = DEV_SERVICE_PASSWORD, tls: SlapdTls | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.service_password = service_password
        self.tls = tls
        self.port = port or _kept_port(self.workdir / "port")
        self.ldaps_port = (_kept_port(self.workdir / "ldaps-port") if tls else None)
        self._proc: subprocess.Popen | None = None

    # --- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        """ldaps:// by the address the test certificate names (127.0.0.1: libldap checks a URL naming
        `localhost` against the machine's own host name instead); only with `tls`."""
        if self.ldaps_port is None:
            raise SlapdError("this slapd was started without TLS")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ldapi_url(self) -> str:
        return "ldapi://" + quote(str(self.workdir / "ldapi"), safe="")

    @property
    def admin_dn(self) -> str:
        return ADMIN_DN

    @property
    def admin_password(self) -> str:
        return (self.workdir / "admin.pw").read_text()

    def settings(self, **overrides: object) -> LdapSettings:
        """Settings for the service account of this instance."""
        values = dict(url=self.url, password=self.service_password, timeout_seconds=2.0)
        values.update(overrides)
        return LdapSettings(**values)

    # --- life cycle ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.workdir / "slapd.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(self, detach: bool = False) -> None:
        """Start (creating the instance on first use) and return once slapd answers.

        detach=True lets the process outlive this Python process (make run); otherwise it is our child.
        """
        if self.pid is not None:
            return
        created = not (self.workdir / "config").exists()
        if created:
            self._create()
        (self.workdir / "port").write_text(str(self.port))
        listeners = [f"{self.url}/", self.ldapi_url]
        if self.ldaps_port is not None:
            (self.workdir / "ldaps-port").write_text(str(self.ldaps_port))
            listeners.append(f"ldaps://127.0.0.1:{self.ldaps_port}/")
        log = open(self.workdir / "slapd.log", "ab")
        # -d 0: stay in the foreground (no fork) so that we own the process; logging stays off.
        cmd = [SLAPD, "-d", "0", "-h", " ".join(listeners), "-F", str(self.workdir / "config")]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=detach)
        log.close()
        self._wait_ready()
        if created:
            self.load(self._render(SCHEMA_DIR / "base.ldif"))

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to clients."""
        self._signal(signal.SIGKILL, 5.0)

    def restart(self) -> None:
        """Start again on the same port with the same data (after stop or kill)."""
        self.stop()
        self.start()

    def load(self, ldif: Path | str) -> None:
        """Add entries over LDAP as cn=admin, so that overlays (memberOf) see them. str = LDIF text."""
        if isinstance(ldif, Path):
            ldif = ldif.read_text()
        cmd = [LDAPADD, "-x", "-H", self.url, "-D", ADMIN_DN, "-y", str(self.workdir / "admin.pw")]
        result = subprocess.run(cmd, input=ldif, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlapdError(f"ldapadd failed ({result.returncode}): {result.stderr.strip()}")

    def load_demo(self) -> None:
        self.load(SCHEMA_DIR / "demo.ldif")

    def bulk_load(self, ldif: Path | str, quick: bool = True) -> None:
        """Stop, slapadd (fast, bypasses overlays: write memberOf into the LDIF if needed), start.

        The LDIF must not repeat the entries of base.ldif, which the instance already has.
        """
        running = self.pid is not None
        self.stop()
        with tempfile.NamedTemporaryFile("w", suffix=".ldif", dir=self.workdir, delete=False) as tmp:
            tmp.write(ldif.read_text() if isinstance(ldif, Path) else ldif)
        try:
            self._run([SLAPADD, *(["-q"] if quick else []), "-n1", "-F", str(self.workdir / "config"),
                       "-l", tmp.name])
        finally:
            os.unlink(tmp.name)
        if running:
            self.start()

    # --- internals -----------------------------------------------------------------------------
    def _create(self) -> None:
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        (self.workdir / "config").mkdir()
        admin_pw = self.workdir / "admin.pw"
        # ldapadd -y sends the whole file: no trailing newline.
        admin_pw.write_text(secrets.token_urlsafe(18))
        admin_pw.chmod(0o600)
        peercred = f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
        config = self._render(SCHEMA_DIR / "config.ldif.in", ROOTPW=ssha(self.admin_password),
                              PEERCRED=peercred, DATADIR=str(self.workdir))
        if self.tls is not None:
            config = config.replace("# @TLS@\n", _tls_config(self.tls))
        config_file = self.workdir / "config.ldif"
        config_file.write_text(config)
        self._run([SLAPADD, "-n0", "-F", str(self.workdir / "config"), "-l", str(config_file)])

    def _render(self, template: Path, **extra: str) -> str:
        values = dict(SUFFIX=SUFFIX, SERVICEDN=SERVICE_DN, CADN=CA_DN,
                      SERVICEPW=ssha(self.service_password), **extra)
        text = template.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        return text

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                log = (self.workdir / "slapd.log").read_text(errors="replace")[-2000:]
                raise SlapdError(f"slapd exited with {self._proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if (self.workdir / "slapd.pid").exists():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise SlapdError(f"slapd did not answer on {self.url} within {timeout} s")

    def _signal(self, sig: int, timeout: float) -> None:
        pid = self._proc.pid if self._proc and self._proc.poll() is None else self.pid
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait(timeout)
        else:  # detached instance from an earlier process: poll
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._proc = None
        # After SIGKILL slapd leaves its pid file; remove it so the next start does not trust it.
        (self.workdir / "slapd.pid").unlink(missing_ok=True)

    @staticmethod
    def _run(cmd: list[str]) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlapdError(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stderr.strip()}")


def _kept_port(port_file: Path) -> int:
    """The port an earlier start of this instance used (a restart keeps its URL), else a free one."""
    return int(port_file.read_text()) if port_file.exists() else free_port()


def _tls_config(tls: SlapdTls) -> str:
    """The cn=config attributes of TLS: our certificate, and client certificates verified when sent."""
    return (f"olcTLSCertificateFile: {Path(tls.cert_file).resolve()}\n"
            f"olcTLSCertificateKeyFile: {Path(tls.key_file).resolve()}\n"
            f"olcTLSCACertificateFile: {Path(tls.client_ca_file).resolve()}\n"
            "olcTLSVerifyClient: try\n")


def _alive(pid: int) -> bool:
    """True if pid is a running (not zombie) slapd: pid files outlive crashes and pids get reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_slapd = b"slapd" in f.read()
    except OSError:
        return False
    return state != "Z" and is_slapd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directory_sync.slapd", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="instance folder, e.g. var/slapd")
    parser.add_argument("--port", type=int, help="loopback port (default: the previous one, else 3890)")
    parser.add_argument("--demo", action="store_true", help="load ldap_schema/demo.ldif on first start")
    parser.add_argument("--service-password-file", type=Path,
                        help="the service account's password (first line) instead of the development one")
    args = parser.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    fresh = not (args.dir / "config").exists()
    port = args.port or (None if (args.dir / "port").exists() else 3890)
    password = (args.service_password_file.read_text().splitlines() or [""])[0] \
        if args.service_password_file else DEV_SERVICE_PASSWORD
    slapd = PrivateSlapd(args.dir, port=port, service_password=password)
    if args.action == "stop":
        slapd.stop()
        print(f"slapd stopped ({args.dir})")
        return 0
    if slapd.pid is not None:
        print(f"slapd already running: {slapd.url} (pid {slapd.pid})")
        return 0
    slapd.start(detach=True)
    if fresh and args.demo:
        slapd.load_demo()
    which = f"password in {args.service_password_file}" if args.service_password_file else \
        "dev password: directory_sync.config.DEV_SERVICE_PASSWORD"
    print(f"slapd running: {slapd.url} ldapi={slapd.ldapi_url} pid={slapd.pid} bind_dn={SERVICE_DN} ({which})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
