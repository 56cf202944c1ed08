"""How stage processes under a flow hand their tracking to the flow: each appends its calls to a file of JSON lines
(`JournalTracker`), and one thread of the flow (`JournalWriter`) replays every whole line into a real tracker
every half second, while the stage still works. A stage process so neither imports MLflow nor opens its store
(1.7 s a stage on a 2-core AMD EPYC: `import mlflow` 1.2 s, opening the SQLite store 0.6 s), and the flow does
that work once, on the core the stage leaves idle. What is MLflow stays in tracking.py: this module knows
trackers, not MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from lmforge.redact import flatten

POLL_S = 0.5  # how often the writer reads the journals: the lag of the MLflow UI behind a stage


class JournalTracker:
    """A stage's Tracker under a flow: one JSON line per call in `folder`."""
    run_id = None

    def __init__(self, folder: str | Path, name: str, tags: Mapping[str, str]):
        self.path = Path(folder) / f"{time.time_ns()}-{os.getpid()}.jsonl"
        self._copies = 0
        self._write("open", name=name, tags={**tags, "lmforge.stage_pid": str(os.getpid())}, pid=os.getpid())

    def _write(self, op: str, **data: Any) -> None:
        with self.path.open("a") as journal:  # one whole line a call: the writer reads whole lines only
            journal.write(json.dumps({"op": op, "ms": int(time.time() * 1000), **data}, default=str) + "\n")

    def log_params(self, params):
        self._write("params", params={k: str(v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics, step=None):
        self._write("metrics", metrics=flatten(metrics), step=step)

    def log_artifact(self, path, artifact_path=None):
        if (path := Path(path)).exists():  # a copy: the stage moves its outputs when it publishes
            self._copies += 1
            copy = self.path.with_suffix(f".{self._copies}") / path.name
            copy.parent.mkdir()
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
            self._write("artifact", path=str(copy), artifact_path=artifact_path)

    def set_tags(self, tags):
        self._write("tags", tags=dict(tags))

    def close(self, status: str) -> None:
        self._write("close", status=status)


@dataclass
class _Journal:
    read: int = 0  # bytes replayed
    name: str = ""
    pid: int = 0
    run: Any = None  # the tracker the lines go to
    status: str | None = None  # as the stage closed it; "settled" once the flow is done with it


class JournalWriter(threading.Thread):
    """Opens the parent tracker (`open_parent()`), then replays the journals of `folder` into child trackers
    (`open_child(parent, name, tags, start_ms)`). Its Tracker calls go to the parent once it is open; what failed
    in the thread is raised by the next call."""

    def __init__(self, open_parent: Callable[[], Any], open_child: Callable[..., Any],
                 abandon: Callable[[Any, str], None]):
        super().__init__(name="lmforge-journal-writer", daemon=True)
        self.folder = Path(tempfile.mkdtemp(prefix="lmforge-journal-"))
        self._open_parent, self._open_child, self._abandon = open_parent, open_child, abandon
        self._lock, self._ready, self._finish = threading.Lock(), threading.Event(), threading.Event()
        self._parent: Any = None
        self._error: BaseException | None = None
        self._journals: dict[Path, _Journal] = {}

    def run(self) -> None:
        try:
            self._parent = self._open_parent()
        except BaseException as err:  # noqa: BLE001 - raised in the flow's thread by its next call
            self._error = err
        self._ready.set()
        while self._error is None and not self._finish.wait(POLL_S):
            with suppress(Exception), self._lock:
                self._replay()

    @property
    def parent(self) -> Any:
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._parent

    @property
    def run_id(self) -> str | None:
        return self.parent.run_id

    def _replay(self) -> None:
        try:
            for path in sorted(self.folder.glob("*.jsonl")):
                journal = self._journals.setdefault(path, _Journal())
                with path.open("rb") as file:
                    file.seek(journal.read)
                    data = file.read()
                whole = data[:data.rfind(b"\n") + 1]
                journal.read += len(whole)
                for line in whole.splitlines():
                    self._apply(journal, json.loads(line))
        except BaseException as err:
            self._error = err
            raise

    def _apply(self, journal: _Journal, entry: dict) -> None:
        op, run = entry["op"], journal.run
        if op == "open":
            journal.name, journal.pid = entry["name"], entry["pid"]
            journal.run = self._open_child(self._parent, entry["name"], entry["tags"], entry["ms"])
        elif op == "params":
            run.log_params(entry["params"])
        elif op == "metrics":
            run.log_metrics(entry["metrics"], entry["step"])
        elif op == "artifact":
            run.log_artifact(entry["path"], entry["artifact_path"])
        elif op == "tags":
            run.set_tags(entry["tags"])
        elif op == "close":
            run.close(entry["status"], entry["ms"])
            journal.status = entry["status"]

    def settle(self, name: str | None, tags: Mapping[str, str] | None = None) -> None:
        """Once the flow is done with stage `name` (None: with every stage): its journals replayed whole; a run
        whose process died without closing it is abandoned (FAILED); the finished one gets `tags`."""
        parent = self.parent
        with self._lock:
            self._replay()
            for journal in self._journals.values():
                if journal.run is None or journal.status == "settled" or name not in (None, journal.name):
                    continue
                if journal.status is None:
                    self._abandon(parent, journal.run.run_id, f"stage process {journal.pid}")
                elif journal.status == "FINISHED" and tags:
                    journal.run.set_tags(tags)
                journal.status = "settled"

    def _call(self, method: str, *args) -> None:
        with self._lock:
            getattr(self.parent, method)(*args)

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, metrics, step=None):
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path, artifact_path=None):
        self._call("log_artifact", path, artifact_path)

    def set_tags(self, tags):
        self._call("set_tags", tags)

    def close(self, status: str) -> None:
        """Every journal replayed and settled, then the parent closed and the journal folder removed."""
        try:
            self._finish.set()
            self.join()
            self.settle(None)
            self._call("close", status)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
