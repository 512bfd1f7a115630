"""A private SoftHSM2 (Debian `softhsm2`): one token folder, a token per server (or per service of a split
deployment), driven through softhsm2-util and inspected with pkcs11-tool (Debian `opensc`), as an operator
would. The benchmark of keys in a token (bench/__main__.py, (10)) and the tests (tests/softhsm.py) use it."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from registration_app.core.files import write_file

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = "87654321"


@dataclass
class SoftHsm:
    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens"

    def start(self) -> None:
        self.tokens.mkdir(parents=True, mode=0o700)
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)  # the servers the tests start inherit it

    def new_token(self, label: str, pin_file: Path) -> str:
        """Initialise a token labelled `label`, its user PIN written to `pin_file` (mode 0600; an existing
        file's PIN is used)."""
        pin = pin_file.read_text().strip() if pin_file.exists() else secrets.token_hex(8)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
                        "--pin", pin], check=True, capture_output=True)
        if not pin_file.exists():
            pin_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_file(pin_file, pin.encode() + b"\n", mode=0o600)
        return label

    def list_objects(self, label: str, pin_file: Path) -> str:
        """`pkcs11-tool --list-objects` of the token, logged in: what an operator sees."""
        return subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", label, "--login",
                               "--pin", pin_file.read_text().strip(), "--list-objects"],
                              check=True, capture_output=True, text=True).stdout


def init_options(hsm: SoftHsm, label: str, data: Path, *file_keys: str) -> list[str]:
    """`autoenroll init` options that generate the keys in a new token `label` (except `file_keys`)."""
    hsm.new_token(label, data / "token.pin")
    return ["--key-store", "pkcs11", "--module", MODULE, "--token", label, "--pin-file", "token.pin",
            *(option for name in file_keys for option in ("--file-key", name))]
