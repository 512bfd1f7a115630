"""Shared fixtures: a real private slapd (tests/conftest_slapd.py) and a running server platform."""

from __future__ import annotations

import pytest

from tests.conftest_slapd import *  # noqa: F401,F403
from tests.e2e.platform import make_platform


@pytest.fixture(scope="session")
def platform(tmp_path_factory, slapd):
    """`autoenroll init` + `autoenroll serve` (gunicorn, TLS, 2 workers) on the session's slapd."""
    p = make_platform(tmp_path_factory.mktemp("platform"), slapd.url)
    try:
        p.start()
        yield p
    finally:
        p.stop()
