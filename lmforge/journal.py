"""How a flow and its stage processes hand their tracking to one writer process. Each appends its calls to a file
of JSON lines in the flow's journal folder (`JournalTracker`); the writer (`replay`, started by the flow) puts
every whole line into a real tracker every half second, while the stages work. No stage process imports MLflow or
opens its store (1.7 s a stage on a 2-core AMD EPYC: `import mlflow` 1.2 s, the SQLite store 0.6 s), and the
writer's imports run on the core a stage leaves idle, not in the flow's process, whose threads share one GIL.
What is MLflow stays in tracking.py: this module knows trackers, not MLflow.

Files: `<ns>-<pid>.jsonl` per stage run, `flow.jsonl` for the flow's run (its `settle` lines say when the flow is
done with a stage), `run_id` once the flow's run is open, `settled.jsonl` (the run each settled stage got), `done`
once the flow's run is closed, `error` when the writer failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from lmforge.redact import flatten

POLL_S = 0.5  # how often the writer reads the journals: the lag of the MLflow UI behind a stage
FLOW = "flow.jsonl"


class JournalTracker:
    """A Tracker whose calls are JSON lines in `folder` (a stage's file, or the flow's with `flow=True`)."""
    run_id = None

    def __init__(self, folder: str | Path, name: str, tags: Mapping[str, str], flow: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / (FLOW if flow else f"{time.time_ns()}-{os.getpid()}.jsonl")
        self._copies = 0
        self._write("open", name=name, tags={**tags, "lmforge.process": str(os.getpid())}, pid=os.getpid())

    def _write(self, op: str, **data: Any) -> None:
        with self.path.open("a") as journal:  # one whole line a call: the writer reads whole lines only
            journal.write(json.dumps({"op": op, "ms": int(time.time() * 1000), **data}, default=str) + "\n")

    def log_params(self, params):
        self._write("params", params={k: str(v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics, step=None):
        self._write("metrics", metrics=flatten(metrics), step=step)

    def log_artifact(self, path, artifact_path=None):
        if (path := Path(path)).exists():  # a copy: a stage moves its outputs when it publishes
            self._copies += 1
            copy = self.path.with_suffix(f".{self._copies}") / path.name
            copy.parent.mkdir()
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
            self._write("artifact", path=str(copy), artifact_path=artifact_path)

    def set_tags(self, tags):
        self._write("tags", tags=dict(tags))

    def close(self, status: str) -> None:
        self._write("close", status=status)


class Writer:
    """The writer process, started before the flow knows whether it will run anything, so that its imports and
    the store's opening overlap the flow's start-up; `cancel()` ends it when nothing runs."""

    def __init__(self, command: list[str]):
        """`command` gets the journal folder and this process's pid as its last two arguments."""
        self.folder = Path(tempfile.mkdtemp(prefix="lmforge-journal-"))
        self.process = subprocess.Popen([*command, str(self.folder), str(os.getpid())], stdin=subprocess.DEVNULL)

    def failure(self, before: str) -> str | None:
        """What went wrong in the writer, or None while it works."""
        if (self.folder / "error").exists():
            return (self.folder / "error").read_text()
        if self.process.poll() is not None and not (self.folder / before).exists():
            return f"the MLflow writer process ended (exit code {self.process.returncode}) before it {before}"
        return None

    def wait_for(self, name: str) -> str:
        """The content of the file `name` once the writer has written it (raises what failed there)."""
        while not (self.folder / name).exists():
            if why := self.failure(name):
                raise RuntimeError(why)
            time.sleep(0.02)
        return (self.folder / name).read_text()

    def cancel(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class FlowJournal(JournalTracker):
    """The flow's side: its own run's calls, and `settle` marks, for the writer process."""

    def __init__(self, writer: Writer, name: str, tags: Mapping[str, str]):
        super().__init__(writer.folder, name, tags, flow=True)
        self.writer = writer
        self._run_id: str | None = None
        self.settled: dict[str, str] = {}  # stage -> its finished run's id, once the flow's run is closed

    def settle(self, stage: str, tags: Mapping[str, str] | None, inputs: list[dict] | None = None) -> None:
        """The flow is done with `stage`: its finished run gets `tags` and the dataset `inputs` it read."""
        self._write("settle", stage=stage, tags=dict(tags or {}), inputs=inputs or [])

    @property
    def run_id(self) -> str:
        """The flow's run id, once the writer has opened the run (raises what failed there)."""
        if self._run_id is None:
            self._run_id = self.writer.wait_for("run_id")
        return self._run_id

    def close(self, status: str) -> None:
        """Every journal written and the flow's run closed by the writer (not waiting for its process to exit);
        then the folder goes."""
        try:
            super().close(status)
            self.writer.wait_for("done")
            self.run_id  # noqa: B018 - read while the folder is there
            if (made := self.writer.folder / "settled.jsonl").exists():
                self.settled = dict(json.loads(line) for line in made.read_text().splitlines())
        finally:
            if self.writer.process.poll() is not None or (self.writer.folder / "done").exists():
                shutil.rmtree(self.writer.folder, ignore_errors=True)
                # reaped in the background: it is past its work, only exiting (no zombie in a long-lived server)
                threading.Thread(target=self.writer.process.wait, daemon=True).start()
            else:
                self.writer.cancel()


@dataclass
class _Journal:
    read: int = 0  # bytes replayed
    name: str = ""
    pid: int = 0
    run: Any = None  # the tracker its lines go to
    status: str | None = None  # as its process closed it; "settled" once the flow is done with it


def replay(folder: Path, owner: int, open_run: Callable[..., Any], abandon: Callable[[Any, str], None],
           alive: Callable[[int], bool]) -> int:
    """The writer process: replays the flow's and its stages' journals into trackers made by
    `open_run(name, tags, start_ms, parent)` until the flow closes its run (0), or marks every open run
    abandoned when the flow's process (`owner`) died (1)."""
    journals: dict[Path, _Journal] = {}
    flow = _Journal()

    def read(path: Path, journal: _Journal) -> list[dict]:
        if not path.exists():  # the flow has not opened its run yet
            return []
        with path.open("rb") as file:
            file.seek(journal.read)
            whole = file.read()
        whole = whole[:whole.rfind(b"\n") + 1]
        journal.read += len(whole)
        return [json.loads(line) for line in whole.splitlines()]

    def stages() -> None:
        for path in sorted(folder.glob("*-*.jsonl")):
            journal = journals.setdefault(path, _Journal())
            for entry in read(path, journal):
                _apply(journal, entry, open_run, flow.run)

    while True:
        if flow.run:  # stages nest under the flow's run; before the flow's lines: a settle follows its stage's last
            stages()
        for entry in read(folder / FLOW, flow):
            if entry["op"] == "open":
                _apply(flow, entry, open_run, None)
                (folder / "run_id.tmp").write_text(flow.run.run_id)
                os.replace(folder / "run_id.tmp", folder / "run_id")
            elif entry["op"] == "settle" or entry["op"] == "close":
                stages()
                for journal in journals.values():
                    if journal.run and journal.status != "settled" and entry.get("stage") in (None, journal.name):
                        if journal.status is None:
                            abandon(journal.run, f"stage process {journal.pid}")
                        elif journal.status == "FINISHED":
                            _finish(folder, journal, entry)
                        journal.status = "settled"
                if entry["op"] == "close":
                    flow.run.close(entry["status"], entry["ms"])
                    (folder / "done").write_text(entry["status"])
                    return 0
            else:
                _apply(flow, entry, open_run, None)
        if not alive(owner):
            for journal in [flow, *journals.values()]:
                if journal.run and journal.status is None:
                    abandon(journal.run, f"the flow process {owner}")
            return 1
        time.sleep(POLL_S)


def _finish(folder: Path, journal: _Journal, settle: dict) -> None:
    """A finished stage run, settled: the flow's tags and dataset inputs, and its id for the flow."""
    if settle.get("tags"):
        journal.run.set_tags(settle["tags"])
    if settle.get("inputs"):
        journal.run.log_inputs(settle["inputs"])
    with (folder / "settled.jsonl").open("a") as made:
        made.write(json.dumps([journal.name, journal.run.run_id]) + "\n")


def _apply(journal: _Journal, entry: dict, open_run: Callable[..., Any], parent: Any) -> None:
    op, run = entry["op"], journal.run
    if op == "open":
        journal.name, journal.pid = entry["name"], entry["pid"]
        journal.run = open_run(entry["name"], entry["tags"], entry["ms"], parent)
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
