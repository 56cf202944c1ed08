"""The one module that talks to MLflow (with registry.py). Stages get a `Tracker`: `NullTracker` (does nothing)
in tests and with `LMFORGE_TRACKING=off`. Runs go to `MLFLOW_TRACKING_URI`, else to `mlflow.db` and
`mlartifacts/` in the project. A flow opens its run in its own process and exports its id in
`LMFORGE_PARENT_RUN_ID` (MLflow has a parent tag, no variable): each stage process logs straight to MLflow in
a run nested under it. A stage run by `dvc repro` alone is a top-level run. Every run is tagged with the process
that will end it (host, pid, start time): a run that a dead process (kill -9) left RUNNING is marked FAILED by
the next run opened in the experiment, and by the flow once it is done with the stage (`settle_stage_runs`).
"""

import functools
import math
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol
from urllib.parse import urlsplit

import psutil

PARENT_ENV = "LMFORGE_PARENT_RUN_ID"  # set by a flow for its stages: their runs nest under this one
EXPERIMENT_ENV = "LMFORGE_EXPERIMENT"
SWITCH_ENV = "LMFORGE_TRACKING"  # "off" disables tracking
ROOT_ENV = "LMFORGE_ROOT"  # project folder holding the default store; the flow sets it for its stages
DEFAULT_EXPERIMENT = "lmforge"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under the one it names
HOST_TAG, PID_TAG, PID_START_TAG = "lmforge.host", "lmforge.pid", "lmforge.pid_start"  # who ends the run
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
    log_params = log_metrics = log_artifact = set_tags = lambda self, *args, **kwargs: None


# HF_TOKEN, GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD, OPENAI_API_KEY...; not TOKENIZERS_PARALLELISM
SECRET_NAME = re.compile(r"(?<![A-Z])TOKEN(?![A-Z])|SECRET|PASSW|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:]*:[^\s/@]*@")


def _secrets() -> list[str]:
    """Values of secret-named variables and URI passwords in the environment, but short ones (a flag "1")."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    for value in os.environ.values():
        found |= {m.group(0).split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1] for m in USERINFO.finditer(value)}
    return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` (strings, mappings and lists of them) with URI passwords and secret values masked as ***."""
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


class MlflowTracker:
    """One MLflow run, each call written as it comes."""

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @_reported  # log_batch splits what it is given into batches within the store's caps
    def log_params(self, params):
        from mlflow.entities import Param
        self.client.log_batch(self.run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()])

    @_reported
    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])

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
    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _started(process: psutil.Process) -> str:  # with the pid, it names one process even once the pid is reused
    return f"{process.create_time():.2f}"


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one that ends the run it creates."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: _started(psutil.Process())}


def owner_gone(tags: Mapping[str, str]) -> bool:
    """Whether the run's owner (its tags) has surely ended: this host, its pid free, a zombie or another process."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        reused = bool(tags.get(PID_START_TAG)) and _started(process) != tags[PID_START_TAG]
        return reused or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # exists, another user's: take it for the owner
        return False


def end_abandoned(client, experiment_id: str) -> list[str]:
    """Mark FAILED the runs a dead process of this host left RUNNING (nobody else would); returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    ended = [run for run in runs if owner_gone(run.data.tags)]
    for run in ended:
        client.set_tag(run.info.run_id, ABANDONED_TAG, f"pid {run.data.tags[PID_TAG]} on {host} ended without "
                       "closing this run (killed?); the next run marked it FAILED")
        client.set_terminated(run.info.run_id, "FAILED")
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
    from mlflow.exceptions import MlflowException
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    local = not os.environ.get("MLFLOW_TRACKING_URI")  # the default store: artifacts beside the database
    try:
        return client.create_experiment(name, (project_root() / "mlartifacts" / name).as_uri() if local else None)
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
def _connect(name: str, tags: Mapping[str, str], parent: str | None, experiment: str) -> MlflowTracker:
    """A new RUNNING run, once the runs that killed processes left RUNNING are ended (listed in its tags)."""
    check_reachable(tracking_uri())
    client = _client()
    exp_id = _experiment_id(client, experiment)
    all_tags = {"lmforge.git_commit": git_commit(project_root()), **tags, **owner_tags(),
                **({PARENT_TAG: parent} if parent else {})}
    try:
        if ended := end_abandoned(client, exp_id):
            all_tags["lmforge.ended_abandoned"] = ",".join(ended[:100])  # within MLflow's tag size
    except Exception as err:  # noqa: BLE001 - housekeeping: it must not cost the new run its tracking
        print(redact(f"lmforge: could not end abandoned MLflow runs: {type(err).__name__}: {err}"), file=sys.stderr)
    run = client.create_run(exp_id, run_name=name, tags={k: redact(str(v)) for k, v in all_tags.items()})
    return MlflowTracker(client, run.info.run_id, exp_id)


@contextmanager
def _run(name: str, tags: Mapping[str, str], parent: str | None, experiment: str, params) -> Iterator[Tracker]:
    """A run with `params`, closed FINISHED, or FAILED when the body raised (the body's error is the one raised)."""
    if os.environ.get(SWITCH_ENV, "on").lower() in {"off", "0", "false", "no"}:
        yield NullTracker()
        return
    tracker = _connect(name, tags, parent, experiment)
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException:
        with suppress(RuntimeError):  # the stage's own error is the one worth reporting
            tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def stage_run(stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None):
    """The run of one stage, nested under the flow's run when there is one."""
    return _run(stage, {"lmforge.stage": stage, **(tags or {})}, os.environ.get(PARENT_ENV),
                os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT), params)


@contextmanager
def flow_run(name: str, experiment: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
    """The parent run of one flow run; stage processes started inside nest their runs under it."""
    with _run(name, {"lmforge.flow": name}, None, experiment, params) as tracker:
        os.environ.update({PARENT_ENV: tracker.run_id or "", EXPERIMENT_ENV: experiment})
        try:
            yield tracker
        finally:  # a served flow runs many: the next one's stages must not nest under this one
            os.environ.pop(PARENT_ENV, None)


@_reported
def settle_stage_runs(parent: Tracker, stage: str, tags: Mapping[str, str] | None = None) -> None:
    """Once the flow is done with `stage`: an attempt whose process was killed is marked FAILED (nobody else
    would), and the finished attempt gets `tags` (DVC's lock hash: DVC writes it after the stage exits)."""
    if not isinstance(parent, MlflowTracker):
        return
    end_abandoned(parent.client, parent.experiment_id)
    query = f"tags.`{PARENT_TAG}` = '{parent.run_id}' and tags.`lmforge.stage` = '{stage}' and status = 'FINISHED'"
    done = parent.client.search_runs([parent.experiment_id], query, max_results=1, order_by=["start_time DESC"])
    if tags and done:
        MlflowTracker(parent.client, done[0].info.run_id, parent.experiment_id).set_tags(tags)


def stage_runs(parent_run_id: str) -> list[dict]:
    """Children of a flow run: name, status, metrics, tags. Used by tests."""
    client = _client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return [{"name": r.info.run_name, "status": r.info.status, "metrics": r.data.metrics, "tags": r.data.tags}
            for r in runs]
