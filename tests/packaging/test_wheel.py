"""The wheel, installed (not editable) in a fresh virtual environment, runs the demo on its own: the private
slapd from its `ldap_schema` package, `autoenroll init` and `autoenroll serve`, from a folder outside the
source tree."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import requests

from bench.platform import eventually, stop_process_group
from directory_sync.slapd import free_port

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("registration_app", "directory_sync", "ldap_schema", "setup.cfg", "pyproject.toml", "README.md")


def run(*cmd, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_the_installed_wheel_runs_slapd_init_and_serve_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "AUTOENROLL_CONFIG", "VIRTUAL_ENV"}}
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (ROOT / name).is_dir() else {}))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", tmp_path / "dist", source,
                cwd=tmp_path, env=env)
    output = built.stdout + built.stderr
    assert "BuildBackendWarning" not in output and "would be ignored" not in output, output  # setuptools' own
    wheel = next((tmp_path / "dist").glob("autoenroll-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("ldap_schema/config.ldif.in", "ldap_schema/base.ldif", "ldap_schema/demo.ldif",
                   "registration_app/agent/autoenroll-agent.service",
                   "registration_app/store/migrations/env.py", "registration_app/store/migrations/script.py.mako",
                   "registration_app/store/migrations/versions/0001_initial_schema.py"):
        assert member in names, member

    # A fresh venv holding only the wheel; its dependencies come from this one's site-packages, read through
    # a path file (offline, fast), which does not run this venv's editable finder.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp_path, env=env).stdout.strip())
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
        cwd=tmp_path, env=env)
    where = run(python, "-c", "import registration_app, directory_sync, ldap_schema as s; "
                "print(registration_app.__file__, directory_sync.__file__, s.__file__)", cwd=tmp_path, env=env)
    assert all(path.startswith(str(purelib)) for path in where.stdout.split()), where.stdout

    work = tmp_path / "demo"  # outside the source tree
    work.mkdir()
    ldap_port, port, http_port = free_port(), free_port(), free_port()
    started = run(python, "-m", "directory_sync.slapd", "start", "--dir", "slapd", "--port", ldap_port, "--demo",
                  cwd=work, env=env)
    server = None
    try:
        assert f"ldap://127.0.0.1:{ldap_port}" in started.stdout
        (work / "autoenroll.toml").write_text(
            f'data_dir = "data"\npublic_url = "https://localhost:{port}"\nbind = "127.0.0.1:{port}"\n'
            f'http_bind = "127.0.0.1:{http_port}"\nhttp_url = "http://127.0.0.1:{http_port}"\n'
            f'[ldap]\nurl = "ldap://127.0.0.1:{ldap_port}"\n')
        assert "initialised:" in run(bin_dir / "autoenroll", "--config", "autoenroll.toml", "init",
                                     cwd=work, env=env).stdout
        log = open(work / "server.log", "wb")
        server = subprocess.Popen([str(bin_dir / "autoenroll"), "--config", "autoenroll.toml", "serve"], cwd=work,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def health_status() -> int | None:
            assert server.poll() is None, (work / "server.log").read_text()
            try:
                return requests.get(f"https://localhost:{port}/health", verify=str(work / "data" / "tls-ca.pem"),
                                    timeout=2).status_code
            except requests.RequestException:
                return None

        status = eventually(health_status, timeout=60, what="an answer from /health")
        assert status == 200, (work / "server.log").read_text()
        assert requests.get(f"http://127.0.0.1:{http_port}/ca.crt", timeout=2).status_code == 200
    finally:
        stop_process_group(server)
        stopped = run(python, "-m", "directory_sync.slapd", "stop", "--dir", "slapd", cwd=work, env=env)
    assert "slapd stopped" in stopped.stdout
