"""The one module that writes to MLflow (with registry.py). Stages get a `Tracker`: `NullTracker` (does nothing)
in tests and with `LMFORGE_TRACKING=off`. Runs go to `MLFLOW_TRACKING_URI`, else to `mlflow.db` and
`mlartifacts/` in the project. Under a flow, the flow and its stage processes journal their calls
(lmforge/journal.py, `LMFORGE_JOURNAL`) and one writer process puts them in MLflow as the flow's run with the stage
runs nested under it; a stage run by `dvc repro` alone writes its top-level run itself. Every run is tagged with the
process that will end it (host, pid, start time): a run that a dead process (kill -9) left RUNNING is marked
FAILED by the next run opened in the experiment, and a stage killed under a live flow by the flow's writer.
"""

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol
from urllib.parse import urlsplit

import psutil

from lmforge import journal
from lmforge.config import STAGES
from lmforge.owners import HOST_TAG, PID_TAG, owner_gone, owner_tags
from lmforge.redact import flatten, redact

JOURNAL_ENV = "LMFORGE_JOURNAL"  # set by a flow for its stages: the folder their calls go to
EXPERIMENT_ENV = "LMFORGE_EXPERIMENT"
SWITCH_ENV = "LMFORGE_TRACKING"  # "off" disables tracking
ROOT_ENV = "LMFORGE_ROOT"  # project folder holding the default store; the flow sets it for its stages
DEFAULT_EXPERIMENT = "lmforge"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under the one it names
ABANDONED_TAG = "lmforge.abandoned"
KIND_TAG, TRAINING = "mlflow.experimentKind", "custom_model_development"  # MLflow's own: which UI the experiment gets


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
    log_params = log_metrics = log_artifact = set_tags = close = lambda self, *args, **kwargs: None


def _reported(call):
    """A failing MLflow call raises one RuntimeError that names the store, credentials masked."""
    @functools.wraps(call)
    def reported(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except (Unreachable, RuntimeError):
            raise
        except Exception as err:
            why = f"{type(err).__name__}: {err}"  # not chained: the cause's message may hold a password
            raise RuntimeError(redact(f"MLflow tracking ({tracking_uri()}) failed: {why}")) from None
    return reported


def _params(params) -> dict[str, str]:
    return {k: redact(str(v))[:6000] for k, v in flatten(params).items()}


def _numbers(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MlflowTracker:
    """One MLflow run, each call written as it comes."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @_reported  # log_batch splits what it is given into batches within the store's caps
    def log_params(self, params):
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in _params(params).items()])

    @_reported
    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in _numbers(metrics).items()])

    @_reported
    def log_artifact(self, path, artifact_path=None):
        if (path := Path(path)).exists():
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(self.run_id, str(path), artifact_path)

    @_reported
    def set_tags(self, tags):
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    @_reported
    def log_inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs (the Dataset column): dicts of name, digest, source (a path) and context."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        self.client.log_inputs(self.run_id, [
            DatasetInput(Dataset(d["name"], d["digest"], "local", json.dumps({"uri": d["source"]})),
                         [InputTag("mlflow.data.context", d["context"])]) for d in datasets])

    @_reported
    def close(self, status: str, end_ms: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status, end_ms)


def end_abandoned(client, experiment_id: str) -> list[str]:
    """Mark FAILED the runs a dead process of this host left RUNNING (nobody else would); returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    ended = [run for run in runs if owner_gone(run.data.tags)]
    for run in ended:
        _abandon(client, run.info.run_id, f"pid {run.data.tags[PID_TAG]} on {host}", "the next run")
    return [run.info.run_id for run in ended]


def project_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or ".").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to an http(s) server, or Unreachable: MLflow's client retries a refusal for minutes."""
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
    """The experiment's id, created as a model-training experiment (the UI opens it on its runs, not on traces)."""
    from mlflow.exceptions import MlflowException
    if (exp := client.get_experiment_by_name(name)) is not None:
        if exp.tags.get(KIND_TAG) != TRAINING:
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING)
        return exp.experiment_id
    local = not os.environ.get("MLFLOW_TRACKING_URI")  # the default store: artifacts beside the database
    try:
        return client.create_experiment(name, (project_root() / "mlartifacts" / name).as_uri() if local else None,
                                        tags={KIND_TAG: TRAINING})
    except MlflowException as err:  # another process (a teammate's flow) created it between our lookup and now
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def git_commit(root: str | Path = ".") -> str:
    with suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    return ""


@_reported
def _connect(name: str, tags: Mapping[str, str], experiment: str, parent: MlflowTracker | None = None,
             start_ms: int | None = None) -> MlflowTracker:
    """A new RUNNING run (nested under `parent`); a top-level one first ends the runs killed processes left RUNNING."""
    client = parent.client if parent else _client()
    exp_id = parent.experiment_id if parent else _experiment_id(client, experiment)
    commit = git_commit(project_root())
    all_tags = {"lmforge.git_commit": commit, "mlflow.source.git.commit": commit, "mlflow.source.type": "LOCAL",
                **tags, **owner_tags(),
                **({PARENT_TAG: parent.run_id} if parent else {})}
    try:
        if not parent and (ended := end_abandoned(client, exp_id)):
            all_tags["lmforge.ended_abandoned"] = ",".join(ended[:100])  # within MLflow's tag size
    except Exception as err:  # noqa: BLE001 - housekeeping: it must not cost the new run its tracking
        print(redact(f"lmforge: could not end abandoned MLflow runs: {type(err).__name__}: {err}"), file=sys.stderr)
    run = client.create_run(exp_id, start_ms, {k: redact(str(v)) for k, v in all_tags.items()}, name)
    return MlflowTracker(client, run.info.run_id, exp_id)


def _switched_off() -> bool:
    return os.environ.get(SWITCH_ENV, "on").lower() in {"off", "0", "false", "no"}


@contextmanager
def _closing(tracker, params) -> Iterator:
    """`tracker` with `params`, closed FINISHED, or FAILED when the body raised (the body's error is the one raised)."""
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException:
        with suppress(RuntimeError):  # the stage's own error is the one worth reporting
            tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None):
    """The run of one stage: journalled for the flow's run when there is one, else a top-level MLflow run."""
    order = {"lmforge.stage_index": f"{STAGES.index(stage) + 1:02d}"} if stage in STAGES else {}  # sort by pipeline
    tags = {"lmforge.stage": stage, "mlflow.source.name": f"tasks/{stage}.py", **order, **(tags or {})}
    if _switched_off():
        return _closing(NullTracker(), params)
    if folder := os.environ.get(JOURNAL_ENV):
        return _closing(journal.JournalTracker(folder, stage, tags), params)
    check_reachable(tracking_uri())
    return _closing(_connect(stage, tags, os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)), params)


@_reported
def _abandon(client, run_id: str, who: str, by: str = "the flow's writer") -> None:
    client.set_tag(run_id, ABANDONED_TAG, f"{who} ended without closing this run (killed?); {by} marked it FAILED")
    client.set_terminated(run_id, "FAILED")


def _open_run(name: str, tags: Mapping[str, str], start_ms: int, parent: MlflowTracker | None) -> MlflowTracker:
    return _connect(name, tags, os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT), parent, start_ms)


def write_journals(folder: str, owner: str) -> int:
    """The writer process of a flow (lmforge/journal.py): MLflow runs from the journals in `folder`."""
    try:
        _experiment_id(_client(), os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))  # MLflow ready before needed
        return journal.replay(Path(folder), int(owner), _open_run,
                              lambda run, who: _abandon(run.client, run.run_id, who), psutil.pid_exists)
    except BaseException as err:  # noqa: BLE001 - the flow reads it and raises it
        text = str(err) if isinstance(err, RuntimeError) else f"MLflow tracking failed: {type(err).__name__}: {err}"
        (Path(folder) / "error").write_text(redact(text))
        return 1


WRITER = "import sys; from lmforge import tracking; sys.exit(tracking.write_journals(*sys.argv[1:]))"
_prestarted: dict[str, journal.Writer] = {}  # experiment -> a writer process waiting for this process's flow run


def prestart(experiment: str) -> None:
    """Start the writer of this process's next flow run in `experiment` now: it imports MLflow and opens the store
    (2 s) while the flow starts up. `discard_prestarted()` ends it when the flow runs nothing."""
    if not _switched_off() and experiment not in _prestarted:
        check_reachable(tracking_uri())
        os.environ[EXPERIMENT_ENV] = experiment
        _prestarted[experiment] = journal.Writer([sys.executable, "-c", WRITER])


def discard_prestarted() -> None:
    while _prestarted:
        _prestarted.popitem()[1].cancel()


@contextmanager
def flow_run(name: str, experiment: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
    """The parent run of one flow run: its calls, and those of the stage processes started inside, go to the
    journal folder the writer process replays into MLflow; what failed there is raised when the flow needs its
    run id, and when it ends."""
    if _switched_off():
        yield NullTracker()
        return
    prestart(experiment)
    flow = journal.FlowJournal(_prestarted.pop(experiment), name,
                               {"lmforge.flow": name, "mlflow.source.name": f"flows/{name}.py"})
    os.environ[JOURNAL_ENV] = str(flow.folder)
    try:
        with _closing(flow, params) as tracker:
            yield tracker
    finally:  # a served flow runs many: the next one's stages must not write to this one's journal
        os.environ.pop(JOURNAL_ENV, None)


def settle_stage_runs(parent: Tracker, stage: str, tags: Mapping[str, str] | None = None,
                      inputs: list[dict] | None = None) -> None:
    """Once the flow is done with `stage`: an attempt whose process was killed is marked FAILED, and the finished
    attempt gets `tags` (DVC's lock hash: DVC writes it after the stage exits) and its dataset `inputs`."""
    if isinstance(parent, journal.FlowJournal):
        parent.settle(stage, tags, inputs)

