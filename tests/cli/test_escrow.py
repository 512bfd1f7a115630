"""`autoenroll escrow sweep`: one sweep of the key authority's pending escrows now, saying what it confirmed
and voided; a pending-escrow grace not longer than the authority timeout is refused at start."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from registration_app.authorities.ca import serial_hex
from registration_app.authorities.certs import random_serial
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.kra import LocalKRA
from registration_app.core.model import KeyType
from registration_app.settings import load_settings
from registration_app.store.escrow import escrow_of
from registration_app.wiring import build_services
from bench.platform import cli


def test_escrow_sweep_voids_an_unsigned_pending_escrow_past_the_grace_and_says_so(tmp_path, slapd):
    config = tmp_path / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\nescrow_pending_grace_seconds = 60\n[ldap]\nurl = "{slapd.url}"\n')
    cli("autoenroll", "--config", str(config), "init")
    services = build_services(load_settings(config))
    try:
        kra = services.kra
        assert isinstance(kra, LocalKRA) and kra.pending_grace == timedelta(seconds=60)
        now = datetime.now(timezone.utc)
        old, fresh = serial_hex(random_serial()), serial_hex(random_serial())
        for serial, at in ((old, now - timedelta(seconds=120)), (fresh, now)):
            kra.escrow_pending(serial, generate_private_key(KeyType.EC_P256), email="alice@example.org",
                               profile="smime-encryption-ec", actor="ra", now=at)

        out = cli("autoenroll", "--config", str(config), "escrow", "sweep").stdout
        assert out.splitlines() == [f"void {old}", "0 confirmed, 1 voided"], out
        states = {serial: getattr(escrow_of(services.db, serial), "state", None) for serial in (old, fresh)}
        assert states == {old: "void", fresh: "pending"}
    finally:
        services.close()


def test_a_pending_grace_not_longer_than_the_authority_timeout_is_refused_at_start(tmp_path, slapd):
    config = tmp_path / "autoenroll.toml"
    config.write_text(f'data_dir = "data"\nescrow_pending_grace_seconds = 10\nauthority_timeout_seconds = 10\n'
                      f'[ldap]\nurl = "{slapd.url}"\n')
    out = cli("autoenroll", "--config", str(config), "escrow", "sweep", check=False)
    assert out.returncode != 0 and "escrow_pending_grace_seconds (10) must be longer than " \
        "authority_timeout_seconds (10)" in out.stderr, out.stdout + out.stderr
