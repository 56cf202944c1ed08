"""The one module that talks to MLflow.

Stages get a `Tracker`; tests and `LMFORGE_TRACKING=off` get `NullTracker`, which does nothing.
Where the runs go: `MLFLOW_TRACKING_URI` if set, else a SQLite file and an artifact folder in the
project (`mlflow.db`, `mlartifacts/`), so no server is needed.

A stage run by `dvc repro` alone is a top-level run (nested under `LMFORGE_PARENT_RUN_ID` when that is
set), written from a worker thread. Under a flow, the stage process never imports MLflow: it writes its
calls to a journal (`LMFORGE_TRACKING_JOURNAL`), and the flow, whose MLflow client is already up,
replays each stage's journal into a run nested under the flow's run while the next stage works.

Every run is tagged with the process that created it and will end it (host, pid, its start time). A run that
process left RUNNING when it died (kill -9) would stay RUNNING forever: the next flow run of the experiment
marks it FAILED, after replaying the killed flow's leftover stage journals under it (`end_abandoned`); so
does the next stage run on its own (`dvc repro`), whose tracker does the same as it connects.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

PARENT_ENV = "LMFORGE_PARENT_RUN_ID"
JOURNAL_ENV = "LMFORGE_TRACKING_JOURNAL"  # set by a flow: its stages journal their calls there
EXPERIMENT_ENV = "LMFORGE_EXPERIMENT"
SWITCH_ENV = "LMFORGE_TRACKING"  # "off" disables tracking
ROOT_ENV = "LMFORGE_ROOT"  # project folder holding the default store; the flow sets it for its stages
DEFAULT_EXPERIMENT = "lmforge"
HOST_TAG, PID_TAG, PID_START_TAG = "lmforge.host", "lmforge.pid", "lmforge.pid_start"  # who ends the run
JOURNAL_TAG = "lmforge.journal"  # a flow run's journal folder: what a killed flow left unreplayed is there
ABANDONED_TAG = "lmforge.abandoned"


class Unreachable(ValueError):
    """MLFLOW_TRACKING_URI names a server that does not answer: one line before the stage starts its work."""


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """Does nothing; for tests and for runs with tracking switched off."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


# ------------------------------------------------------------------------------------------ secrets
# HF_TOKEN, GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD, OPENAI_API_KEY...; not TOKENIZERS_PARALLELISM
SECRET_NAME = re.compile(r"(?<![A-Z])TOKEN(?![A-Z])|SECRET|PASSW|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:]*:[^\s/@]*@")


def _secrets() -> list[str]:
    """Values to mask: environment variables named like secrets, and passwords inside URIs in the environment.
    Short values (a flag like "1") are left alone: masking them would garble every number."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    for value in os.environ.values():
        found |= {m.group(0).split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1] for m in USERINFO.finditer(value)}
    return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` (a string, or mappings and lists of them) with credentials masked as ***: the user:password of
    URIs and the values of secret environment variables. Applied to all that lmforge writes or logs."""
    if isinstance(value, str):
        text = USERINFO.sub(r"\g<scheme>***@", value)
        for secret in _secrets():
            text = text.replace(secret, "***")
        return text
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys, lists of mappings indexed (sources.0.name)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


class MlflowTracker:
    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @staticmethod
    def _metrics(metrics, step=None, timestamp_ms=None) -> list:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        return [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]

    def _log_metric_items(self, items: list) -> None:
        for i in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics; each batch is one commit
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_metrics(self, metrics, step=None, timestamp_ms=None):
        self._log_metric_items(self._metrics(metrics, step, timestamp_ms))

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(str(v)))

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def replay(self, journal: Path, tags: Mapping[str, str]) -> None:
        """A run nested under this one from a stage's journal (then deleted), tagged with `tags` if it
        finished; a journal without its "end" record (a killed process) makes a FAILED run."""
        calls = []
        for line in journal.read_text().splitlines():
            try:
                calls.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed process
                break
        if not calls or calls[0]["op"] != "start":
            return
        start = calls[0]
        run = self.client.create_run(self.experiment_id, run_name=start["name"], start_time=start["time"],
                                     tags={**start["tags"], **owner_tags(), "mlflow.parentRunId": self.run_id})
        child, status, end = MlflowTracker(self.client, run.info.run_id, self.experiment_id), "FAILED", None
        metrics = []  # every step's metrics in a few batches, not a commit per logging call
        for call in calls[1:]:
            op = call["op"]
            if op == "params":
                child.log_params(call["data"])
            elif op == "metrics":
                metrics += child._metrics(call["data"], call["step"], call["time"])
            elif op == "artifact":
                child.log_artifact(journal.parent / call["path"], call["artifact_path"])
            elif op == "tags":
                child.set_tags(call["data"])
            elif op == "end":
                status, end = call["status"], call["time"]
        child._log_metric_items(metrics)
        if status == "FINISHED":  # the caller's tags (DVC's lock hash) describe the attempt that made the outputs
            child.set_tags(tags)
        self.client.set_terminated(run.info.run_id, status, end_time=end)
        shutil.rmtree(journal.with_suffix(".artifacts"), ignore_errors=True)
        journal.unlink()


class JournalTracker:
    """A stage's tracking calls as JSON lines, replayed into MLflow by the flow (`MlflowTracker.replay`).

    Artifacts are copied at once: the stage moves its files when it publishes them.
    """

    run_id = None

    def __init__(self, folder: Path, name: str, tags: Mapping[str, str]):
        stem = f"{name}-{time.time_ns():020d}-{os.getpid()}"
        self._path, self._artifacts = folder / f"{stem}.jsonl", folder / f"{stem}.artifacts"
        self._fh = self._path.open("w")
        self._n = 0
        self._write("start", name=name, tags={k: str(v) for k, v in tags.items()}, time=int(time.time() * 1000))

    def _write(self, op: str, **fields) -> None:
        self._fh.write(json.dumps(redact({"op": op, **fields}), default=str) + "\n")
        self._fh.flush()

    def log_params(self, params):
        self._write("params", data=flatten(params))

    def log_metrics(self, metrics, step=None):
        self._write("metrics", data=flatten(metrics), step=step, time=int(time.time() * 1000))

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if not path.exists():
            return
        self._n += 1
        copy = self._artifacts / str(self._n) / path.name
        copy.parent.mkdir(parents=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
        self._write("artifact", path=str(copy.relative_to(self._path.parent)), artifact_path=artifact_path)

    def set_tags(self, tags):
        self._write("tags", data={k: str(v) for k, v in tags.items()})

    def close(self, status: str) -> None:
        self._write("end", status=status, time=int(time.time() * 1000))
        self._fh.close()


class BackgroundTracker:
    """An MlflowTracker driven from a worker thread, in call order.

    Importing MLflow and opening its store take seconds; a stage should not wait for them, nor for each
    write. The worker connects while the stage starts its own work; log calls only enqueue (metrics keep
    the time they were logged). `log_artifact` waits until the file is uploaded, because the stage moves
    its files right after; `close` waits for everything. A tracking error is raised at those waits.
    """

    def __init__(self, connect: Callable[[], MlflowTracker]):
        self._calls: queue.Queue = queue.Queue()
        self._connected = threading.Event()
        self._tracker: MlflowTracker | None = None
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, args=(connect,), name="lmforge-tracking", daemon=True)
        self._worker.start()

    @property
    def run_id(self) -> str | None:
        self._connected.wait()
        self._raise()
        return self._tracker.run_id

    def _work(self, connect) -> None:
        try:
            self._tracker = connect()
        except BaseException as err:  # noqa: BLE001 - reported to the stage at its next wait
            self._error = err
        self._connected.set()
        while (item := self._calls.get()) is not None:
            method, args, done = item
            if self._error is None:
                try:
                    getattr(self._tracker, method)(*args)
                except BaseException as err:  # noqa: BLE001
                    self._error = err
            if done is not None:
                done.set()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(redact(f"MLflow tracking ({tracking_uri()}) failed: {self._error}")) from self._error

    def _call(self, method: str, *args, wait: bool = False) -> None:
        done = threading.Event() if wait else None
        self._calls.put((method, args, done))
        if done is not None:
            done.wait()
            self._raise()

    # Flattened at enqueue time: a snapshot, so the stage may go on mutating its own dicts.
    def log_params(self, params):
        self._call("log_params", flatten(params))

    def log_metrics(self, metrics, step=None):
        self._call("log_metrics", flatten(metrics), step, int(time.time() * 1000))

    def log_artifact(self, path, artifact_path=None):
        self._call("log_artifact", path, artifact_path, wait=True)

    def set_tags(self, tags):
        self._call("set_tags", dict(tags))

    def replay(self, journal: Path, tags: Mapping[str, str]) -> None:
        self._call("replay", journal, dict(tags))

    def close(self, status: str) -> None:
        """Finish the run with `status` once every queued call is done, and stop the worker."""
        try:
            self._call("_terminate", status, wait=True)
        finally:  # also when tracking failed: the worker must not outlive the run (a served flow runs many)
            self._calls.put(None)
            self._worker.join()


class ProcessTracker:
    """An MlflowTracker in a child process, for the flow's parent run.

    Importing MLflow and opening its store take seconds of CPU; in a thread they would hold the GIL against
    the flow's own work (DVC's planning, the report card). A child process does them on another core
    while the flow plans and runs its first stage, and replays the stages' journals there. Calls go as
    JSON lines down its stdin; only the waits (`run_id`, `log_artifact`, `close`) read an answer back.
    Errors surface at those waits.
    """

    def __init__(self, root: Path, experiment: str):
        env = {**os.environ, ROOT_ENV: str(root)}
        # its messages (MLflow's "creating tables"...) go to a file, read back into the error if it fails
        self._log = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen([sys.executable, "-c", "from lmforge.tracking import _serve; _serve()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                      text=True, bufsize=1)
        self._run_id: str | None = None
        self._send("connect", experiment)

    def _send(self, op: str, *args, wait: bool = False):
        try:
            self._proc.stdin.write(json.dumps([op, args, wait], default=str) + "\n")
            self._proc.stdin.flush()
            answer = self._proc.stdout.readline() if wait else "{}"
        except (OSError, ValueError):  # a broken pipe, or a write after close
            answer = ""
        if not answer:
            self._log.seek(0)
            tail = " | ".join(self._log.read().strip().splitlines()[-3:])
            raise RuntimeError(redact(f"MLflow tracking ({tracking_uri()}) failed: its process exited "
                                      f"({self._proc.poll()}): {tail or 'no message'}"))
        reply = json.loads(answer)
        if "error" in reply:
            raise RuntimeError(redact(f"MLflow tracking ({tracking_uri()}) failed: {reply['error']}"))
        return reply.get("value")

    def start(self, name: str, tags: Mapping[str, str]) -> "ProcessTracker":
        self._send("start", name, {k: str(v) for k, v in tags.items()})
        return self

    @property
    def run_id(self) -> str | None:
        if self._run_id is None:
            self._run_id = self._send("run_id", wait=True)
        return self._run_id

    def log_params(self, params):
        self._send("log_params", flatten(params))

    def log_metrics(self, metrics, step=None):
        self._send("log_metrics", flatten(metrics), step, int(time.time() * 1000))

    def log_artifact(self, path, artifact_path=None):
        self._send("log_artifact", str(path), artifact_path, wait=True)

    def set_tags(self, tags):
        self._send("set_tags", dict(tags))

    def replay(self, journal: Path, tags: Mapping[str, str]) -> None:
        self._send("replay", str(journal), dict(tags))

    def release(self) -> None:
        """Send nothing more: the process ends once it has done every call it was sent."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def close(self, status: str) -> None:
        """Finish the run with `status` once every call before is done, and wait for the process."""
        try:
            if self._proc.poll() is None:
                self.run_id  # noqa: B018 - kept for after the close, as BackgroundTracker keeps it
                self._send("_terminate", status, wait=True)
        finally:
            self.release()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._log.close()


def _serve() -> None:
    """ProcessTracker's child: connect, then run each call in order; answer the waits on stdout."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # MLflow's own prints go to stderr, never into the answers
    tracker: MlflowTracker | None = None
    client = experiment_id = error = None
    for line in sys.stdin:
        op, args, wait = json.loads(line)
        value = None
        if error is None:
            try:
                if op == "connect":
                    client = _client()
                    experiment_id = _experiment_id(client, args[0])
                elif op == "start":
                    ended = _end_abandoned_quietly(client, experiment_id)  # a flow run starts: earlier ones are over
                    tags = redact({"lmforge.git_commit": git_commit(project_root()), **args[1], **owner_tags(), **ended})
                    run = client.create_run(experiment_id, run_name=args[0], tags=tags)
                    tracker = MlflowTracker(client, run.info.run_id, experiment_id)
                elif op == "run_id":
                    value = tracker.run_id
                elif op == "replay":
                    tracker.replay(Path(args[0]), args[1])
                else:
                    getattr(tracker, op)(*args)
            except Exception as err:  # noqa: BLE001 - answered at the next wait
                error = f"{type(err).__name__}: {err}"
        if wait:
            answers.write(json.dumps({"error": error} if error else {"value": value}) + "\n")


# ------------------------------------------------------------------------------- abandoned runs
def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, start time at [19]); None without it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one that ends the run it creates. The start time tells a reused pid apart."""
    stat = _proc_stat(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: stat[19] if stat else ""}


def owner_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's owner tags name has certainly ended: this host, and its pid is free, a zombie
    or another process now. Runs of other hosts, or from before these tags, are never judged."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        pass
    stat = _proc_stat(int(pid))
    if stat is None:  # no /proc here: it exists, so take it for the owner
        return False
    return stat[0] in ("Z", "X") or bool(tags.get(PID_START_TAG)) and stat[19] != tags[PID_START_TAG]


def end_abandoned(client, experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's runs left RUNNING by a process of this host that has ended (a killed flow or
    stage: nobody else would ever end them), replaying first the stage journals a killed flow left, so the
    killed stage's attempt is there as a FAILED run with what it logged. Returns the ids of the runs ended."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    ended = []
    for run in runs:
        tags = run.data.tags
        if not owner_gone(tags):
            continue
        journal = Path(tags.get(JOURNAL_TAG) or "/nonexistent")
        if journal.is_dir():  # in the order the stages ran (the stem is <stage>-<time_ns>-<pid>)
            tracker = MlflowTracker(client, run.info.run_id, experiment_id)
            for path in sorted(journal.glob("*.jsonl"), key=lambda p: p.stem.rsplit("-", 2)[-2]):
                tracker.replay(path, {})
            shutil.rmtree(journal, ignore_errors=True)
        client.set_tag(run.info.run_id, ABANDONED_TAG,
                       f"pid {tags[PID_TAG]} on {host} ended without closing this run (killed?); the next run marked it FAILED")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


def _end_abandoned_quietly(client, experiment_id: str) -> dict[str, str]:
    """`end_abandoned` before a new run is created; the tag that lists what it ended, for that run (none: {})."""
    try:
        ended = end_abandoned(client, experiment_id)
    except Exception as err:  # noqa: BLE001 - housekeeping: it must not cost the new run its tracking
        print(redact(f"lmforge: could not end abandoned MLflow runs: {type(err).__name__}: {err}"), file=sys.stderr)
        ended = []
    return {"lmforge.ended_abandoned": ",".join(ended[:100])} if ended else {}  # within MLflow's tag size


# ------------------------------------------------------------------------------------------- set-up
def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "on").lower() not in {"off", "0", "false", "no"}


def project_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to an http(s) tracking server, or Unreachable. MLflow's own client retries a refused
    connection with back-off for minutes before it gives up with a traceback."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        socket.create_connection(address, timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise Unreachable(f"MLFLOW_TRACKING_URI {redact(uri)} is unreachable ({why}): start the server, fix the URI, "
                          f"or set {SWITCH_ENV}=off to run without tracking") from None


def _client():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # local default: artifacts beside the database
        location = (project_root() / "mlartifacts" / name).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:  # another process (a teammate's flow) created it between our lookup and now
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _connect(name: str, tags: Mapping[str, str], parent: str | None, experiment: str) -> MlflowTracker:
    client = _client()
    exp_id = _experiment_id(client, experiment)
    ended = _end_abandoned_quietly(client, exp_id)  # a stage of a bare `dvc repro` ends what killed runs left too
    all_tags = {"lmforge.git_commit": git_commit(project_root()), **tags, **owner_tags(), **ended}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=name, tags={k: redact(str(v)) for k, v in all_tags.items()})
    return MlflowTracker(client, run.info.run_id, exp_id)


@contextmanager
def _run(name: str, tags: Mapping[str, str], parent: str | None, experiment: str | None) -> Iterator[BackgroundTracker]:
    experiment = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    with _closing(BackgroundTracker(lambda: _connect(name, tags, parent, experiment))) as tracker:
        yield tracker


@contextmanager
def _closing(tracker):
    """Close `tracker` FINISHED, or FAILED when the body raised (the body's error is the one raised)."""
    try:
        yield tracker
    except BaseException:
        try:
            tracker.close("FAILED")
        except RuntimeError:  # the stage's own error is the one worth reporting
            pass
        raise
    tracker.close("FINISHED")


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """The run of one stage, nested under the flow's run when there is one."""
    if not enabled():
        yield NullTracker()
        return
    tags = {"lmforge.stage": stage, **(tags or {})}
    journal = os.environ.get(JOURNAL_ENV)
    if not journal:
        check_reachable(tracking_uri())
    if journal:
        tracker = JournalTracker(Path(journal), stage, {"lmforge.git_commit": git_commit(project_root()), **tags})
        context = _closing(tracker)
    else:
        context = _run(stage, tags, os.environ.get(PARENT_ENV), None)
    with context as tracker:
        tracker.log_params(params)
        yield tracker


_warm: dict[tuple[str, str], ProcessTracker] = {}


def prewarm(root: str | Path, experiment: str) -> None:
    """Start the flow's tracking process now (it takes seconds to connect), for a `flow_run` to come."""
    key = (str(Path(root).resolve()), experiment)
    if enabled() and key not in _warm:
        _warm[key] = ProcessTracker(Path(key[0]), experiment)


def discard_prewarmed() -> None:
    """Let go of prewarmed processes no run used: each ends by itself once connected, never killed while
    it may be writing to the store, and nobody waits for it."""
    while _warm:
        _warm.popitem()[1].release()


@contextmanager
def flow_run(name: str, experiment: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
    """The parent run of one flow run, in a tracking process (`prewarm`ed, or started now to connect while
    the first stage runs). Stage processes started inside journal their calls, which `nest_stage_runs`
    replays under it."""
    if not enabled():
        yield NullTracker()
        return
    os.environ[EXPERIMENT_ENV] = experiment
    journal = tempfile.mkdtemp(prefix="lmforge-journal-")
    previous = os.environ.get(JOURNAL_ENV)
    os.environ[JOURNAL_ENV] = journal
    tracker = _warm.pop((str(project_root()), experiment), None) or ProcessTracker(project_root(), experiment)
    try:
        with _closing(tracker.start(name, {"lmforge.flow": name, JOURNAL_TAG: journal})) as tracker:
            tracker.log_params(params)
            yield tracker
    finally:  # the run is closed: every queued replay is done
        if previous is None:
            os.environ.pop(JOURNAL_ENV, None)
        else:
            os.environ[JOURNAL_ENV] = previous
        shutil.rmtree(journal, ignore_errors=True)


def nest_stage_runs(parent: Tracker, stage: str, tags: Mapping[str, str] | None = None) -> None:
    """Queue the journals of `stage` (one per attempt) for replay under `parent`; returns at once."""
    folder = os.environ.get(JOURNAL_ENV)
    if not isinstance(parent, (BackgroundTracker, ProcessTracker)) or not folder:
        return
    for journal in sorted(Path(folder).glob(f"{stage}-*.jsonl")):
        parent.replay(journal, tags or {})


def stage_runs(parent_run_id: str) -> list[dict]:
    """Children of a flow run: name, status, metrics. Used by the flow's summary and by tests."""
    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return [
        {"name": r.info.run_name, "status": r.info.status, "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
        for r in runs
    ]
