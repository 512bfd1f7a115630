"""The one writer of private files: the server's keys and secrets (authorities/pki_files.py) and the
agent's store (agent/store.py). Standard library only, so that both sides may use it.

The content goes to a fresh, randomly named temporary file in the same folder, opened with
O_CREAT | O_EXCL | O_NOFOLLOW and the final mode: nobody can plant a symlink or a file under that name
beforehand, and the file is never readable by others, not even for a moment or under a lax umask. It is
fsynced, then becomes the final name: by a hard link when the name must not exist yet (`replace=False`:
never overwrite, AlreadyExists), or by rename when it replaces a previous version (a rename replaces a
symlink at the final name, it never writes through it). The folder is fsynced after, so the new name
survives a crash. The final name only ever holds complete content.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import AlreadyExists

__all__ = ["write_file"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_file(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = False) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits; a key file must be exactly `mode`
            view = memoryview(bytes(data))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(f"refusing to overwrite {path.name}", path=str(path)) from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # renamed into place
            pass
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
