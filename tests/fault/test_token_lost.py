"""Keys in a SoftHSM2 token: the token removed mid-run (its folder taken away) gives a 503 problem, nothing
half-issued and an audit row, and the next request succeeds once it is back; a wrong PIN, a missing token
a key label not found or a module that does not load stops `autoenroll serve` at start with a clear
message. (The tests run as root, for whom a folder's mode is no barrier: the token's folder is moved
out of SoftHSM's token folder instead of being made unreadable.)"""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import func, select

from registration_app.store.models import AuditEvent, Certificate, Escrow
from bench.platform import SUITE_SETTINGS, cli, make_platform
from tests.e2e.test_enrollment import invite_and_bootstrap, ldap_certificates
from tests.softhsm import key_store_options


@pytest.fixture(scope="module")
def hsm_platform(tmp_path_factory, slapd, softhsm):
    data = tmp_path_factory.mktemp("token-lost")
    before = set(softhsm.tokens.iterdir())
    options = key_store_options(softhsm, "token-lost", data)
    (token_dir,) = set(softhsm.tokens.iterdir()) - before
    with make_platform(data, slapd.url, init_options=tuple(options), **SUITE_SETTINGS).running() as p:
        p.token_dir = token_dir  # type: ignore[attr-defined]
        yield p


def issued_for(platform, email: str) -> tuple[int, int]:
    with platform.transaction() as session:
        certificates = session.execute(select(func.count()).select_from(Certificate).where(
            Certificate.email == email, Certificate.profile == "smime-encryption")).scalar_one()
        escrows = session.execute(select(func.count()).select_from(Escrow).where(Escrow.email == email)).scalar_one()
    return certificates, escrows


def test_a_token_removed_mid_run_is_a_503_with_nothing_half_issued_and_the_next_request_succeeds(
        hsm_platform, new_user, tmp_path):
    _, email = new_user(groups=("smime-users",))
    invite_and_bootstrap(hsm_platform, email)
    away = tmp_path / "token-away"
    shutil.move(hsm_platform.token_dir, away)  # out of SoftHSM's token folder: the token is gone
    try:
        refused = hsm_platform.agent("enroll", "--email", email, "--profile", "smime-encryption", check=False)
    finally:
        shutil.move(away, hsm_platform.token_dir)
    assert refused.returncode == 1 and "key_store_unavailable" in refused.stderr
    assert issued_for(hsm_platform, email) == (0, 0)  # no certificate, no escrow
    with hsm_platform.transaction() as session:
        failures = session.execute(select(AuditEvent.detail).where(
            AuditEvent.event == "key_store.unavailable", AuditEvent.subject == email)).scalars().all()
    assert failures and failures[0]["code"] == "key_store_unavailable"

    # The token is back: the next request is issued, escrowed and published.
    out = hsm_platform.agent("enroll", "--email", email, "--profile", "smime-encryption").stdout
    assert "published in the directory" in out
    assert issued_for(hsm_platform, email) == (1, 1)
    assert ldap_certificates(hsm_platform, email)
    log = hsm_platform.log.read_text()
    assert "request.bug" not in log and "Traceback" not in log  # no 5xx but the 503
    assert "PIN" not in log and (hsm_platform.data / "token.pin").read_text().strip() not in log


@pytest.mark.parametrize("setting, value, message", [
    ("PIN_FILE", "wrong.pin", "is not the user PIN of token 'token-lost'"),
    ("TOKEN", "no-such-token", "no PKCS#11 token labelled 'no-such-token'"),
    ("TOKEN", "token-without-keys", "no private key labelled 'autoenroll-ca' in token 'token-without-keys'"),
    ("MODULE", "/usr/lib/no-such-pkcs11.so", "cannot load the PKCS#11 module /usr/lib/no-such-pkcs11.so"),
], ids=["wrong PIN", "token missing", "key label not found", "module not loadable"])
def test_serve_refuses_to_start_with_a_clear_message(hsm_platform, softhsm, setting, value, message):
    if value == "token-without-keys":
        softhsm.new_token(value, hsm_platform.data / "token.pin")  # the same PIN, no keys
    wrong = hsm_platform.data / "wrong.pin"
    if not wrong.exists():
        wrong.write_text("000000\n")
        wrong.chmod(0o600)
    result = cli("autoenroll", "--config", str(hsm_platform.config), "serve", check=False,
                 env={f"AUTOENROLL_KEY_STORE__{setting}": value}, timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert "000000" not in result.stderr + result.stdout


def test_a_pin_file_others_may_read_is_refused(hsm_platform):
    pin = hsm_platform.data / "token.pin"
    pin.chmod(0o644)
    try:
        result = hsm_platform.autoenroll("serve", check=False)
    finally:
        pin.chmod(0o600)
    assert result.returncode != 0 and "token.pin is open to other users" in result.stderr
