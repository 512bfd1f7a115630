"""The agent's store writes every private file through the one safe writer (core/files.py, shared with
authorities/pki_files.py): mode 0600 whatever the umask, never through a symlink, never half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from registration_app.agent.store import AgentStore, write_private
from registration_app.authorities import pki_files
from registration_app.core import files

EMAIL = "alice@example.org"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def lax_umask():
    previous = os.umask(0o000)  # the writer must not depend on a careful umask
    try:
        yield
    finally:
        os.umask(previous)


def test_one_writer_for_the_agent_and_the_server():
    assert pki_files.write_file is files.write_file  # pki_files writes through the same function
    import registration_app.agent.store as store
    assert store.write_file is files.write_file


def test_the_store_writes_private_files_0600_under_a_lax_umask(tmp_path, lax_umask):
    folder = AgentStore(tmp_path / "store").user(EMAIL, create=True)
    key = ec.generate_private_key(ec.SECP256R1())
    folder.save_signature(key, ["-----BEGIN CERTIFICATE-----\n"])
    delivered = folder.save_delivery("smime-encryption", "abc", "cert", [], b"p12", "password")
    folder.save_state({"current": {}})
    written = [folder.signature_key_path, folder.signature_cert_path, *delivered.values(), folder.path / "state.json"]
    assert {path.name: mode(path) for path in written} == {path.name: 0o600 for path in written}
    assert mode(folder.path) == 0o700 and mode(folder.path.parent) == 0o700
    assert sorted(p.name for p in folder.path.iterdir()) == sorted(p.name for p in written)  # no leftovers


def test_a_symlink_planted_at_the_old_temporary_name_is_not_followed(tmp_path):
    """The store used to write `<name>.tmp` with O_TRUNC and no O_EXCL: whoever could write the folder
    could point that name at any file of the agent's user and have it overwritten with a private key."""
    folder = AgentStore(tmp_path / "store").user(EMAIL, create=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (folder.path / "signature.key.tmp").symlink_to(victim)
    folder.save_signature(ec.generate_private_key(ec.SECP256R1()), ["chain"])
    assert victim.read_bytes() == b"precious"
    assert folder.signature_key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_symlink_at_the_final_name_is_replaced_not_written_through(tmp_path):
    folder = AgentStore(tmp_path / "store").user(EMAIL, create=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    state = folder.path / "state.json"
    state.symlink_to(victim)
    folder.save_state({"current": {"smime-signature": "abc"}})
    assert victim.read_bytes() == b"precious"
    assert not state.is_symlink() and mode(state) == 0o600
    assert folder.state() == {"current": {"smime-signature": "abc"}}


def test_a_rewrite_replaces_the_whole_content(tmp_path):
    path = tmp_path / "state.json"
    write_private(path, b"a much longer first version")
    write_private(path, b"short")
    assert path.read_bytes() == b"short" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_server_side_never_overwrites(tmp_path):
    from registration_app.core.errors import AlreadyExists
    path = tmp_path / "secret"
    files.write_file(path, b"first")
    with pytest.raises(AlreadyExists):
        files.write_file(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
