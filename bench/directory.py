"""Bulk pre-provisioning (`autoenroll provision --group`) and reconcile (`autoenroll sync reconcile`) over
a directory loaded with `slapadd -q`. When a command is missing (an older
checkout), the benchmark says "not available yet" instead of failing."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import ldap

from directory_sync.config import AttributeMap

from .platform import BIN, server_environment
from .world import GROUP_DN, user_dn

NOT_AVAILABLE = "not available yet"


@dataclass
class CommandResult:
    available: bool
    seconds: float = 0.0
    items: int = 0
    output: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def command_help(platform, *args: str) -> str | None:
    """The --help text of `autoenroll ARGS`, or None when the command does not exist."""
    result = platform.autoenroll(*args, "--help", check=False)
    return result.stdout if result.returncode == 0 else None


def _count(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text, re.IGNORECASE)
    return int(match.group(1).replace(",", "")) if match else None


def provision(platform, *, group: str = GROUP_DN, profile: str = "smime-encryption-ec",
              expected: int) -> CommandResult:
    help_text = command_help(platform, "provision")
    if help_text is None:
        return CommandResult(False)
    args = ["provision", "--group", group]
    if "--profile" in help_text:
        args += ["--profile", profile]
    started = time.perf_counter()
    result = platform.autoenroll(*args, check=False, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"autoenroll {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    issued = _issued_certificates(platform, profile)
    return CommandResult(True, seconds, issued, result.stdout + result.stderr, {"expected": expected})


def _issued_certificates(platform, profile: str) -> int:
    from sqlalchemy import func, select

    from registration_app.store.db import Database
    from registration_app.store.models import Certificate
    db = Database(platform.db_url)
    try:
        with db.transaction() as session:
            return session.execute(select(func.count()).select_from(Certificate)
                                   .where(Certificate.profile == profile)).scalar_one()
    finally:
        db.dispose()


# `autoenroll` with its peak RSS written at exit: the kernel's VmHWM of the new program alone. (wait4's
# ru_maxrss would count the benchmark's own memory too: it covers the child before exec, which shares it.)
_MEASURED = """import atexit, resource, sys
_to = sys.argv.pop(1)
def _peak():
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as status, open(_to, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
        out.write(f" {cpu.ru_utime + cpu.ru_stime:.2f}")
atexit.register(_peak)
from registration_app.cli import main
sys.argv[0] = "autoenroll"
main()
"""


def _run_measured(platform, args: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """`autoenroll ARGS` as platform.autoenroll runs it, the peak RSS (MB) and the CPU seconds of that
    process."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as peak:
        command = [str(BIN / "python"), "-c", _MEASURED, peak.name, "--config", str(platform.config), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=server_environment(platform.env),
                                timeout=3600)
        text = open(peak.name).read().split()
    return result, int(text[0]) / 1024 if text else 0.0, float(text[1]) if text else 0.0  # VmHWM is in kB


def reconcile(platform, *, incremental: bool, entries: int) -> CommandResult:
    help_text = command_help(platform, "sync", "reconcile")
    if help_text is None:
        return CommandResult(False)
    args = ["sync", "reconcile"]
    if incremental:
        flag = next((f for f in ("--incremental", "--since-last", "--changed") if f in help_text), None)
        if flag is None:
            return CommandResult(False, output="no incremental option in `sync reconcile --help`")
        args.append(flag)
    elif "--full" in help_text:
        args.append("--full")
    if "--json" in help_text:
        args.append("--json")
    started = time.perf_counter()
    result, peak_rss_mb, cpu = _run_measured(platform, args)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"autoenroll {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    extra = {"command_seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb, 1), "command_cpu_s": round(cpu, 2)}
    try:  # the pass's own duration, without the command's start-up (imports, settings, migrations)
        import json
        seconds = float(json.loads(result.stdout)["duration_seconds"]) or seconds
    except (ValueError, KeyError, TypeError):
        pass
    return CommandResult(True, seconds, entries, result.stdout + result.stderr, extra)


def leave_group(slapd, uids: list[str]) -> None:
    """Take users out of the entitling group over LDAP (the memberOf overlay updates their entries)."""
    conn = _admin(slapd)
    try:
        for uid in uids:
            conn.modify_ext_s(GROUP_DN, [(ldap.MOD_DELETE, "member", [user_dn(uid).encode()])])
    finally:
        conn.unbind_ext_s()


def clear_certificates(slapd, dns: tuple[str, ...]) -> None:
    """Remove every userCertificate;binary value of these entries (what the bare pipeline wrote)."""
    conn = _admin(slapd)
    try:
        for dn in dns:
            try:
                conn.modify_ext_s(dn, [(ldap.MOD_DELETE, AttributeMap.openldap().certificate, None)])
            except ldap.NO_SUCH_ATTRIBUTE:
                pass  # nothing to clear
    finally:
        conn.unbind_ext_s()


def _admin(slapd):
    """python-ldap bound as cn=admin of the benchmark's slapd."""
    conn = ldap.initialize(slapd.url)
    conn.simple_bind_s(slapd.admin_dn, slapd.admin_password)
    return conn
