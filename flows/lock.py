"""One flow run per project at a time.

A second `python -m flows.lifecycle` (or `make run`, or a scheduled run) in the same project waits for the
first, saying once which run holds the project, or with `--no-wait` refuses in one line. The lock is
filelock's OS file lock (`flock` on Unix) on `.dvc/tmp/lmforge-flow.lock`: the kernel drops it when its holder
exits, even on `kill -9`, so a crashed run never leaves a stale lock behind. Re-entrant within one process,
across threads (the CLI takes it before Prefect starts, the flow body takes it again for runs started by a
worker).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout


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


def _write_holder(fd: int) -> None:
    """Called by filelock once the lock is ours (not again on re-entry): say who holds it, for the waiters."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}).encode(), 0)


def _lock(path: Path) -> FileLock:
    # one instance per path in this process, shared by every thread: that is what makes it re-entrant (a second
    # instance would flock a second descriptor and wait on its own process)
    return FileLock(path, thread_local=False, is_singleton=True, preserve_lock_file=True, on_acquired=_write_holder)


@contextmanager
def project_lock(root: str | Path, wait: bool = True, poll_s: float = 1.0,
                 say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Iterator[None]:
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if not wait:
            raise Busy(f"project {path.parents[2]} is busy: {holder(path)} (wait for it, or run "
                       "without --no-wait to queue behind it)") from None
        say(f"waiting for {holder(path)}")  # once; then filelock polls until the holder is gone
        lock.acquire(poll_interval=poll_s)
    try:
        yield
    finally:
        if lock.lock_counter == 1:  # the outermost hold: nothing claims the project once it is released
            os.truncate(path, 0)
        lock.release()
