"""Certificates out of the box pass the S/MIME Baseline Requirements lint: a platform set up as `make run`
does it (`autoenroll init` choosing the CRL/AIA host name, then `autoenroll serve`), every profile (EC
and RSA, signature and encryption, under an EC and an RSA CA) checked by pkilint's
`lint_cabf_smime_cert`: no finding at WARNING or above."""

from __future__ import annotations

import subprocess
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bench.platform import BIN, ServerPlatform, configure
from registration_app.agent import actions
from registration_app.agent.client import AgentConfig, RegistrationClient
from registration_app.agent.store import AgentStore

GROUP = "cn=smime-users,ou=groups,dc=example,dc=org"
# The built-in profiles, and an RSA signature profile so that every kind of key is linted.
PROFILES = {"smime-signature": ("signature", "ec-p256", "either"),
            "smime-signature-rsa": ("signature", "rsa-3072", "server"),
            "smime-encryption": ("encryption", "rsa-3072", "server"),
            "smime-encryption-ec": ("encryption", "ec-p256", "server")}


def default_platform(data, ldap_url: str, ca_key_type: str) -> ServerPlatform:
    """A platform whose configuration names no http_url: `autoenroll init` records the one it chooses."""
    profiles = {name: {"usage": usage, "key_type": key, "key_source": source, "groups": [GROUP]}
                for name, (usage, key, source) in PROFILES.items()}
    platform = configure(data, ldap_url, http_url=None, profiles=profiles)
    out = platform.autoenroll("init", "--ca-key-type", ca_key_type)
    assert "http_url in" in out.stdout, out.stdout
    return platform


@pytest.fixture(scope="module", params=["ec-p256", "rsa-3072"], ids=["EC CA", "RSA CA"])
def lint_platform(request, tmp_path_factory, slapd):
    p = default_platform(tmp_path_factory.mktemp("lint"), slapd.url, request.param)
    try:
        p.start()
        yield p
    finally:
        p.stop()


def findings(pem_path) -> list[str]:
    """pkilint's findings at WARNING or above for one certificate (the S/MIME type detected from its policy)."""
    result = subprocess.run([str(BIN / "lint_cabf_smime_cert"), "lint", "--detect", "--severity", "WARNING",
                             "--format", "TEXT", str(pem_path)], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines or result.returncode == 0, (result.returncode, result.stderr)  # findings, or a clean lint
    return lines


def test_init_records_a_public_crl_and_aia_host(lint_platform):
    http_url = tomllib.loads(lint_platform.config.read_text())["http_url"]
    host = http_url.split("//", 1)[1].rsplit(":", 1)[0]
    assert "." in host and host != "localhost" and not host.replace(".", "").isdigit()


def test_every_profile_passes_the_smime_br_lint(lint_platform, new_user, tmp_path):
    _, email = new_user(groups=("smime-users",))
    config = AgentConfig.load(lint_platform.agent_config)
    store = AgentStore(config.store)
    issued = {}
    with RegistrationClient(config) as client:
        issued["bootstrap (agent's EC key)"] = actions.bootstrap(
            client, store, email, lint_platform.autoenroll("invite", email).stdout.strip()).files["certificate"]
        for name in PROFILES:
            if name != "smime-signature":
                issued[name] = actions.enroll(client, store, email, name, replace=True).files["certificate"]
        issued["smime-signature (server key)"] = actions.enroll(
            client, store, email, "smime-signature", replace=True).files["certificate"]
    report = {}
    for name, path in issued.items():
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        (tmp_path / f"{name}.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
        report[name] = findings(tmp_path / f"{name}.pem")
    assert not any(report.values()), "\n".join(f"{name}:\n  " + "\n  ".join(lines)
                                               for name, lines in report.items() if lines)
