"""Where the request threads' wall-clock time goes, from `py-spy record --idle -f raw` of the workers
(`python -m bench --only server --py-spy wall`): waiting for slapd, for the SQLite writer lock, for the
group's COMMIT, or running (which includes waiting for the GIL or a core: py-spy cannot tell those apart
from running)."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path

# First match wins, most specific first: (category, substrings of the stack that must all be there, the
# first of them among its innermost frames: where the thread is blocked now, not a frame it will return to).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("slapd: modify (publication)", ("_ldap_call", "_publish")),
    ("slapd: search (entitlement)", ("_ldap_call", "find_user")),
    ("slapd: other", ("_ldap_call",)),
    ("SQLite writer lock: waiting", ("_WriterQueue.held",)),
    ("group commit: waiting for the group", ("Event.wait", "GroupCommit.run")),
    ("SQLite COMMIT (fsync)", ("do_commit",)),
)
RUNNING = "running (or waiting for the GIL, a core)"
REQUEST = "handle_request"  # a gunicorn thread serving a request (not the poller, not a pool's thread)


def category(stack: str) -> str:
    innermost = stack.split(";")[-2:]
    for name, needles in CATEGORIES:
        if all(needle in stack for needle in needles) and any(needles[0] in frame for frame in innermost):
            return name
    return RUNNING


def shares(lines: Iterable[str]) -> dict[str, float]:
    """Each category's share of the request threads' samples (folded stacks: `frame;frame;... count`)."""
    counts: collections.Counter = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if REQUEST in stack and count.isdigit():
            counts[category(stack)] += int(count)
    total = sum(counts.values())
    return {name: counts[name] / total for name, _ in (*CATEGORIES, (RUNNING, ()))} if total else {}


def worker_shares(paths: Iterable[Path]) -> list[dict[str, float]]:
    return [shares(path.read_text().splitlines()) for path in paths if path.exists()]
