"""The one module that talks to MLflow.

Stages get a `Tracker`; tests and `LMFORGE_TRACKING=off` get `NullTracker`, which does nothing.
Where the runs go: `MLFLOW_TRACKING_URI` if set, else a SQLite file and an artifact folder in the
project (`mlflow.db`, `mlartifacts/`), so no server is needed. A flow opens a parent run and exports
its id in `LMFORGE_PARENT_RUN_ID`; each stage's run (named after the stage) nests under it. A stage
run by `dvc repro` alone has no parent and is a top-level run.
"""

from __future__ import annotations

import math
import os
import queue
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

PARENT_ENV = "LMFORGE_PARENT_RUN_ID"
EXPERIMENT_ENV = "LMFORGE_EXPERIMENT"
SWITCH_ENV = "LMFORGE_TRACKING"  # "off" disables tracking
ROOT_ENV = "LMFORGE_ROOT"  # project folder holding the default store; the flow sets it for its stages
DEFAULT_EXPERIMENT = "lmforge"


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
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics, step=None, timestamp_ms=None):
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


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
            raise RuntimeError(f"MLflow tracking ({tracking_uri()}) failed: {self._error}") from self._error

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

    def close(self, status: str) -> None:
        """Finish the run with `status` once every queued call is done, and stop the worker."""
        self._call("_terminate", status, wait=True)
        self._calls.put(None)
        self._worker.join()


# ------------------------------------------------------------------------------------------- set-up
def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "on").lower() not in {"off", "0", "false", "no"}


def project_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


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
    return client.create_experiment(name, artifact_location=location)


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _connect(name: str, tags: Mapping[str, str], parent: str | None, experiment: str) -> MlflowTracker:
    client = _client()
    exp_id = _experiment_id(client, experiment)
    all_tags = {"lmforge.git_commit": git_commit(project_root()), **tags}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    return MlflowTracker(client, run.info.run_id)


@contextmanager
def _run(name: str, tags: Mapping[str, str], parent: str | None, experiment: str | None) -> Iterator[BackgroundTracker]:
    experiment = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    tracker = BackgroundTracker(lambda: _connect(name, tags, parent, experiment))
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
    with _run(stage, {"lmforge.stage": stage, **(tags or {})}, os.environ.get(PARENT_ENV), None) as tracker:
        tracker.log_params(params)
        yield tracker


@contextmanager
def flow_run(name: str, experiment: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
    """The parent run of one flow run. It connects in the background; `nest_children` (before the first
    stage starts) waits for it and exports its id, by which the stages' runs nest under it."""
    if not enabled():
        yield NullTracker()
        return
    os.environ[EXPERIMENT_ENV] = experiment
    with _run(name, {"lmforge.flow": name}, None, experiment) as tracker:
        tracker.log_params(params)
        previous = os.environ.get(PARENT_ENV)
        try:
            yield tracker
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def nest_children(parent: Tracker) -> None:
    """Make runs started from here on (stage processes included) children of `parent` (no-op untracked)."""
    if parent.run_id:
        os.environ[PARENT_ENV] = parent.run_id


def tag_child(parent_run_id: str | None, stage: str, tags: Mapping[str, str]) -> None:
    """Tag the latest child run of `stage` under a parent (the flow adds DVC's lock hash after a stage ran)."""
    if not enabled() or not parent_run_id:
        return
    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`lmforge.stage` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    for run in runs:
        for k, v in tags.items():
            client.set_tag(run.info.run_id, k, str(v))


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
