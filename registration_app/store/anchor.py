"""The audit chain's head, anchored outside the database: `audit.checkpoint` in the data folder.

The keyed chain (audit.py) shows any row changed, inserted or deleted in the middle, but not the tail
cut off together with the head row, nor the whole table emptied. So every transaction that appended audit
rows writes, after it committed, a checkpoint (rows in the chain, last id, last hash) MACed with the
audit key, and `audit verify` demands that the chain still holds that row with that hash and count.

Design (this runs on the enrollment's hot path):
- written AFTER the commit, never before: a checkpoint never names a row that was rolled back, so verify
  cannot cry wolf; a process killed between commit and write leaves the checkpoint behind the database,
  which verify accepts (the database may hold more than the checkpoint, never less);
- monotonic under several workers: the write holds an flock on `audit.checkpoint` and replaces the
  record only with a longer chain (more rows). A checkpoint that our batch does not extend directly (an
  append of another worker or host came between) is replaced only after one primary-key read shows the
  database still holds its row with its hash: after a wipe the anchor stays where it was, so the
  deletion keeps being reported instead of being forgotten once new rows pass the old count;
- cheap: one fixed-size record rewritten in place (pwrite at offset 0 of a file kept open, under the
  flock), no fsync, no rename, which would cost as much as the fsync'd commit itself (PERFORMANCE.md). Readers take the flock too, so they never see half a record; after a crash the record is the
  old or the new one (it lies in one sector), at worst one commit behind: a lag, not an alarm.

Each data folder has its own checkpoint: in a split deployment each host anchors what it appended.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("autoenroll.audit")

_CONTEXT = b"autoenroll audit checkpoint v1\0"


@dataclass(frozen=True)
class Checkpoint:
    rows: int
    last_id: int
    last_hash: str

    def _body(self) -> bytes:
        return json.dumps([self.rows, self.last_id, self.last_hash], separators=(",", ":")).encode()

    def encode(self, key: bytes) -> bytes:
        mac = hmac.new(key, _CONTEXT + self._body(), hashlib.sha256).hexdigest()
        return json.dumps({"rows": self.rows, "last_id": self.last_id, "last_hash": self.last_hash,
                           "mac": mac}).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, key: bytes) -> Checkpoint:
        try:
            doc = json.loads(data)
            checkpoint = cls(int(doc["rows"]), int(doc["last_id"]), str(doc["last_hash"]))
            mac = str(doc["mac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("the audit checkpoint cannot be read") from exc
        expected = hmac.new(key, _CONTEXT + checkpoint._body(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, expected):
            raise ValueError("the audit checkpoint's MAC does not verify (not written with this audit key)")
        return checkpoint


class _Frames(threading.local):
    stack: list | None = None


_RECORD = 256  # bytes: the checkpoint's JSON padded with spaces, so every write replaces all of it


class AuditAnchor:
    """The checkpoint file, and the heads that this thread's open transactions appended."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self.key = key
        self._frames = _Frames()
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._threads = threading.Lock()  # an flock does not exclude threads sharing its file
        # The record last read or written here, and what it decoded to: the next commit mostly finds
        # the same bytes (this process wrote them), which then need no JSON decoding or MAC check.
        self._known: tuple[bytes, Checkpoint] | None = None

    def read(self) -> Checkpoint | None:
        """The checkpoint, None when there is none yet; ValueError when it is there but not ours."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            data = os.pread(fd, _RECORD, 0)
        finally:
            os.close(fd)
        return Checkpoint.decode(data, self.key) if data.strip() else None

    # -- the transactions of one thread (Database.transaction / write) -------------------------
    @contextmanager
    def transaction(self, row_hash: Callable[[int], str | None]) -> Iterator[None]:
        frames = self._frames.stack
        if frames is None:
            frames = self._frames.stack = []
        frames.append(None)
        committed = False
        try:
            yield
            committed = True
        finally:
            appended = frames.pop()
            if committed and appended is not None:
                try:
                    self.advance(*appended, row_hash=row_hash)
                except Exception:  # the commit stands; verify reports a lagging checkpoint as a lag only
                    log.exception("event=audit.checkpoint_failed path=%s", self.path)

    def mark(self) -> object:
        """What this thread's innermost transaction has appended so far, for `restore`."""
        frames = self._frames.stack
        return frames[-1] if frames else None

    def restore(self, mark: object) -> None:
        """Forget the appends since `mark`: a savepoint of the transaction rolled them back."""
        frames = self._frames.stack
        if frames:
            frames[-1] = mark

    def appended(self, before: str, head: Checkpoint) -> None:
        """Called by audit.py in a transaction: its batch moved the head from hash `before` to `head`."""
        frames = self._frames.stack
        if frames:
            first = frames[-1][0] if frames[-1] is not None else before
            frames[-1] = (first, head)

    def advance(self, before: str, head: Checkpoint, *, row_hash: Callable[[int], str | None]) -> None:
        with self._locked() as fd:
            try:
                data = os.pread(fd, _RECORD, 0)
                current = self._decoded(data)
            except ValueError as exc:
                log.error("event=audit.checkpoint_unreadable path=%s error=%r: rewritten", self.path, str(exc))
                current = None
            if current is not None:
                if current.rows >= head.rows:
                    return  # a later commit (another worker) got here first
                if current.last_hash != before and row_hash(current.last_id) != current.last_hash:
                    log.error("event=audit.checkpoint_kept rows=%d last_id=%d: the database no longer holds "
                              "the checkpointed row; run `autoenroll audit verify`", current.rows, current.last_id)
                    return
            self._write(fd, head)

    def write_now(self, head: Checkpoint) -> None:
        """Set the checkpoint whatever it said."""
        with self._locked() as fd:
            self._write(fd, head)

    def _decoded(self, data: bytes) -> Checkpoint | None:
        """The checkpoint of a record read under the lock (called with `_threads` held)."""
        known = self._known
        if known is not None and known[0] == data:
            return known[1]
        if not data.strip():
            return None
        checkpoint = Checkpoint.decode(data, self.key)
        self._known = (data, checkpoint)
        return checkpoint

    def _write(self, fd: int, head: Checkpoint) -> None:
        record = head.encode(self.key)
        if len(record) > _RECORD:
            raise ValueError("audit checkpoint record too long")
        record = record.ljust(_RECORD - 1) + b"\n"
        os.pwrite(fd, record, 0)
        self._known = (record, head)

    @contextmanager
    def _locked(self) -> Iterator[int]:
        with self._threads:
            if self._fd_pid != os.getpid():  # a flock belongs to the open file: re-open after fork
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                self._fd_pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self._fd
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
