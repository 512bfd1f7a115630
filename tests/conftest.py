"""Shared fixtures: a real private slapd (tests/conftest_slapd.py) and a running server platform.

`pytest --database=postgresql` runs the same tests with every platform on a database of its own on a
private PostgreSQL server (bench/postgres.py) instead of its SQLite file; tests of SQLite's own
behaviour are marked `sqlite_only` and skipped then.
"""

from __future__ import annotations

import os

import pytest

from bench import postgres
from bench.platform import SUITE_SETTINGS, make_platform
from tests.conftest_slapd import *  # noqa: F401,F403
from tests.samba_dc import samba_dc  # noqa: F401 (a Samba AD DC, session-scoped)
from tests.softhsm import key_store_params


def pytest_addoption(parser):
    parser.addoption("--database", choices=("sqlite", "postgresql"), default="sqlite",
                     help="the database of the platforms under test (default: their SQLite files)")


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: a test of SQLite's own behaviour (locks, pragmas, files)")
    config.addinivalue_line("markers", "postgresql_only: a test of the PostgreSQL server (run with --database=postgresql)")
    if config.getoption("--database") == "postgresql":
        server = postgres.PrivatePostgres()
        server.start()
        config._autoenroll_postgres = server
        os.environ[postgres.ENV] = server.url


def pytest_unconfigure(config):
    server = getattr(config, "_autoenroll_postgres", None)
    if server is not None:
        os.environ.pop(postgres.ENV, None)
        server.stop()


def pytest_collection_modifyitems(config, items):
    on_postgres = config.getoption("--database") == "postgresql"
    skip = pytest.mark.skip(reason="SQLite's own behaviour; this run is on PostgreSQL" if on_postgres
                            else "needs the PostgreSQL run (make test runs it: --database=postgresql)")
    for item in items:
        if ("sqlite_only" if on_postgres else "postgresql_only") in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_server(pytestconfig):
    """The private PostgreSQL server of `--database=postgresql` (bench/postgres.py)."""
    return pytestconfig._autoenroll_postgres


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A private SoftHSM2 token folder for the session (SOFTHSM2_CONF set for the servers started)."""
    from tests.softhsm import SoftHsm
    previous = os.environ.get("SOFTHSM2_CONF")
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    hsm.start()
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def platform(request, tmp_path_factory, slapd):
    """`autoenroll init` + `autoenroll serve` (gunicorn, TLS, 2 workers) on the session's slapd; with
    `indirect` parametrisation "softhsm", with the CA, TLS CA and KRA keys in a SoftHSM2 token named after
    its data folder (pytest may build a parametrised session fixture more than once: one label each)."""
    data = tmp_path_factory.mktemp("platform")
    with make_platform(data, slapd.url, init_options=key_store_params(request, data, data.name),
                       **SUITE_SETTINGS).running() as p:
        yield p
