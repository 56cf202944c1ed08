"""One flow run per project at a time.

A second `python -m flows.lifecycle` (or `make run`, or a scheduled run) in the same project waits for the
first, saying once which run holds the project, or with `--no-wait` refuses in one line. The lock is an
OS file lock (`flock`) on `.dvc/tmp/lmforge-flow.lock`: the kernel drops it when its holder exits, even
on `kill -9`, so a crashed run never leaves a stale lock behind. Re-entrant within one process (the CLI
takes it before Prefect starts, the flow body takes it again for runs started by a worker).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_held: dict[str, int] = {}  # lock file -> nesting depth in this process


class Busy(RuntimeError):
    """The project is held by another run and the caller asked not to wait."""


def lock_path(root: str | Path) -> Path:
    return Path(root).resolve() / ".dvc" / "tmp" / "lmforge-flow.lock"


def holder(path: Path) -> str:
    """Who holds the lock, in words, from what the holder wrote into the file."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another lmforge run (starting)"
    started = time.strftime("%H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"the run started {started} by pid {info.get('pid')} on {info.get('host')}: {info.get('command')}"


@contextmanager
def project_lock(root: str | Path, wait: bool = True, poll_s: float = 1.0,
                 say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Iterator[None]:
    path = lock_path(root)
    key = str(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise Busy(f"project {path.parents[2]} is busy: {holder(path)} (wait for it, or run "
                               "without --no-wait to queue behind it)") from None
                if not told:
                    say(f"waiting for {holder(path)}")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the file releases the lock
