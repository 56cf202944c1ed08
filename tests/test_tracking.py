"""The MLflow seam against a real SQLite store in a temp folder."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lmforge import owners, tracking

ROOT = Path(__file__).resolve().parents[1]

# What a stage process does under the flow: it finds the flow's journal folder in the environment and appends its
# calls there; the flow writes them to MLflow. With a second argument it is killed with SIGKILL mid-stage, so
# nothing of its own ends its run.
STAGE = """
import os, signal, sys
from lmforge import tracking
with tracking.stage_run("pretrain", {"lr": 0.1, "sources": [{"name": "a"}]}) as t:
    t.log_metrics({"loss": 2.0}, step=1)
    t.log_metrics({"loss": 1.0, "nested": {"x": 3}}, step=2)
    t.log_artifact(sys.argv[1])
    if len(sys.argv) > 2:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def stage_runs(parent_run_id: str) -> list[dict]:
    """Children of a flow run: name, status, metrics, tags."""
    client = tracking._client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'")
    return [{"name": r.info.run_name, "status": r.info.status, "metrics": r.data.metrics, "tags": r.data.tags}
            for r in runs]


def _stage_process(*args: str) -> int:
    return subprocess.run([sys.executable, "-c", STAGE, *args], cwd=ROOT, timeout=120).returncode


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", tracking.JOURNAL_ENV, tracking.EXPERIMENT_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _run_id(client, parent_id: str, name: str) -> str:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.mlflow.runName = '{name}'")[0].info.run_id


def test_flow_run_nests_stage_runs_with_params_metrics_artifacts(store):
    (store / "samples.txt").write_text("hello")
    with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
        assert _stage_process(str(store / "samples.txt")) == 0
        (store / "samples.txt").unlink()  # the stage moves its outputs when it publishes: the upload came first
        tracking.settle_stage_runs(parent, "pretrain", {"dvc.lock_md5": "abc"})
    children = stage_runs(parent.run_id)
    assert [c["name"] for c in children] == ["pretrain"]
    child = children[0]
    assert child["status"] == "FINISHED" and child["metrics"]["loss"] == 1.0 and child["metrics"]["nested.x"] == 3
    assert child["tags"]["dvc.lock_md5"] == "abc" and child["tags"]["lmforge.stage"] == "pretrain"
    assert child["tags"]["lmforge.stage_index"] == "04"  # mix, base, tokenizer, pretrain: a column to sort by
    assert child["tags"]["lmforge.pid"] not in (str(os.getpid()), child["tags"]["lmforge.process"])  # the writer's
    assert child["tags"]["lmforge.process"] != str(os.getpid())  # journalled by the stage process
    client = tracking._client()
    run_id = _run_id(client, parent.run_id, "pretrain")
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [
        (1, 2.0), (2, 1.0)]
    assert client.get_run(run_id).data.params["sources.0.name"] == "a"
    assert client.get_run(parent.run_id).data.params == {"preset": "tiny"}
    assert (store / "mlflow.db").exists()
    # a training experiment: MLflow's UI opens it on its runs, not on an empty traces overview
    assert client.get_experiment_by_name("exp").tags["mlflow.experimentKind"] == "custom_model_development"
    assert list((store / "mlartifacts").rglob("samples.txt"))


def test_failed_stage_is_marked_failed(store):
    (store / "samples.txt").write_text("hello")
    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        with pytest.raises(RuntimeError):
            with tracking.stage_run("pretrain", {}):
                raise RuntimeError("boom")
        assert _stage_process(str(store / "samples.txt"), "kill") == -9  # its run is left RUNNING...
        tracking.settle_stage_runs(parent, "pretrain", {"dvc.lock_md5": "abc"})  # ...until the flow settles it
    runs = stage_runs(parent.run_id)
    assert sorted(r["status"] for r in runs) == ["FAILED", "FAILED"]
    killed = next(r for r in runs if "loss" in r["metrics"])
    assert killed["metrics"]["loss"] == 1.0 and tracking.ABANDONED_TAG in killed["tags"]  # what it logged stays
    assert not any("dvc.lock_md5" in r["tags"] for r in runs)  # the hash describes a finished attempt only


def test_a_stage_alone_is_a_top_level_run(store):
    with tracking.stage_run("mix", {"a": 1}) as t:
        assert isinstance(t, tracking.MlflowTracker)
        t.log_metrics({"docs": 3.0})
    run = tracking._client().get_run(t.run_id)
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags and run.data.metrics["docs"] == 3.0


def test_off_switch_gives_null_tracker(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    with tracking.stage_run("mix", {"a": 1}) as t:
        assert isinstance(t, tracking.NullTracker)
    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        assert isinstance(parent, tracking.NullTracker)
        tracking.settle_stage_runs(parent, "mix", {"dvc.lock_md5": "abc"})
    assert not (tmp_path / "mlflow.db").exists()


def test_every_logged_step_reaches_the_run_in_order(store):
    """The run gets every metric with its step, in the order logged, and the params it was opened with."""
    with tracking.stage_run("pretrain", {"lr": 0.1}) as t:
        for step in range(5):
            t.log_metrics({"loss": 5.0 - step, "skipped": float("nan"), "flag": True}, step=step)
    client = tracking._client()
    run = client.get_run(t.run_id)
    history = client.get_metric_history(t.run_id, "loss")
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"} and set(run.data.metrics) == {"loss"}
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 5.0 - s) for s in range(5)]


def test_a_tracking_failure_is_reported_and_the_stage_error_wins(store, monkeypatch):
    def broken():
        raise ConnectionError("no server at http://alice:s3cret-lmforge@nowhere")

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "_client", broken)
        with pytest.raises(RuntimeError, match="MLflow tracking .* failed: ConnectionError: no server") as err:
            with tracking.stage_run("mix", {}):
                pytest.fail("the stage ran without its run")
        assert "s3cret-lmforge" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(RuntimeError, match="failed: ConnectionError: gone"):  # a write that fails mid-stage
        with tracking.stage_run("mix", {}) as t:
            monkeypatch.setattr(t.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("gone")))
            t.log_metrics({"docs": 1.0})
    with pytest.raises(ValueError, match="the stage's own"):
        with tracking.stage_run("mix", {}) as t:
            monkeypatch.setattr(t.client, "set_terminated", broken)  # closing the run fails too
            raise ValueError("the stage's own error")


def test_flow_run_exports_its_run_to_stages_only_while_it_lasts(store):
    """Stages started inside a flow run nest under it; once it ends, FINISHED or FAILED, a stage is top-level."""
    with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
        assert Path(os.environ[tracking.JOURNAL_ENV]).is_dir() and os.environ[tracking.EXPERIMENT_ENV] == "exp"
        parent.log_metrics({"mix.seconds": 1.5})
    assert tracking.JOURNAL_ENV not in os.environ
    with pytest.raises(KeyboardInterrupt):
        with tracking.flow_run("lifecycle", "exp", {}) as failed:
            raise KeyboardInterrupt
    assert tracking.JOURNAL_ENV not in os.environ
    with tracking.stage_run("mix", {}) as alone:
        pass
    client = tracking._client()
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"mix.seconds": 1.5}
    assert run.data.tags["lmforge.flow"] == "lifecycle" and run.data.tags["lmforge.process"] == str(os.getpid())
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(alone.run_id).info.experiment_id == run.info.experiment_id  # the flow's experiment stays
    assert "mlflow.parentRunId" not in client.get_run(alone.run_id).data.tags


def test_flow_run_tracking_failures_are_reported(store, monkeypatch):
    """The flow's run opens in the writer process while the first stage works: what failed there is raised when
    the flow asks for its run id, and when it ends."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(RuntimeError, match="nosuchscheme"):
        with tracking.flow_run("lifecycle", "exp", {}) as parent:
            parent.log_metrics({"mix.seconds": 1.0})
            assert parent.run_id, "the flow's run id was given without the run"
    with pytest.raises(RuntimeError, match="nosuchscheme"):
        with tracking.flow_run("lifecycle", "exp", {}):
            pass
    assert tracking.JOURNAL_ENV not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-lmforge@127.0.0.1:9")
    with pytest.raises(tracking.Unreachable, match=r"http://\*\*\*@127.0.0.1:9 is unreachable") as err:
        with tracking.flow_run("lifecycle", "exp", {}):
            pass
    assert "s3cret-lmforge" not in str(err.value)


def test_many_params_and_metrics_land_whole(store):
    """Past MLflow's caps per batch (100 params, 1000 metrics) and over many steps, nothing is lost."""
    params = {f"p{i}": i for i in range(250)}
    with tracking.stage_run("pretrain", params) as t:
        t.log_metrics({f"m{i}": float(i) for i in range(1500)})
        for step in range(300):
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    client = tracking._client()
    run = client.get_run(t.run_id)
    assert len(run.data.params) == 250 and len(run.data.metrics) == 1501
    assert len(client.get_metric_history(t.run_id, "loss")) == 300


def _dead_owner() -> dict[str, str]:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return {owners.HOST_TAG: socket.gethostname(), owners.PID_TAG: str(gone.pid), owners.PID_START_TAG: "1"}


def test_runs_left_running_by_a_dead_process_are_marked_failed_by_the_next_flow_run(store):
    """kill -9 leaves runs RUNNING that their dead owners will never end (a flow's, and its stage's with what the
    stage logged); the next flow run ends them FAILED. A live owner's run, another host's, or one without owner tags
    stay; a zombie's or a reused pid's end."""
    client = tracking._client()
    exp = tracking._experiment_id(client, "exp")
    dead = _dead_owner()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not yet waited for
    deadline = time.monotonic() + 30
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    undead = {**dead, owners.PID_TAG: str(zombie.pid),
              owners.PID_START_TAG: owners.started(psutil.Process(zombie.pid))}

    def run(name, tags):
        return client.create_run(exp, run_name=name, tags=tags).info.run_id

    killed_flow = run("lifecycle", dead)
    killed_stage = run("pretrain", {**dead, "mlflow.parentRunId": killed_flow, "lmforge.stage": "pretrain"})
    client.log_metric(killed_stage, "loss", 3.0, step=5)
    killed_alone = run("mix", dead)  # a `dvc repro` killed on its own
    reused_pid = run("sft", {**owners.owner_tags(), owners.PID_START_TAG: "0"})  # our pid, another process's start
    zombie_run = run("reward", undead)
    live = run("tokenizer", owners.owner_tags())
    elsewhere = run("lora", {**dead, owners.HOST_TAG: "another-host"})
    untagged = run("grpo", {})

    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        assert parent.run_id
    zombie.wait()
    runs = (killed_flow, killed_stage, killed_alone, reused_pid, zombie_run, live, elsewhere, untagged)
    status = {r: client.get_run(r).info.status for r in runs}
    assert status == {killed_flow: "FAILED", killed_stage: "FAILED", killed_alone: "FAILED", reused_pid: "FAILED",
                      zombie_run: "FAILED", live: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    assert f"pid {dead[owners.PID_TAG]}" in client.get_run(killed_flow).data.tags[tracking.ABANDONED_TAG]
    [stage] = stage_runs(killed_flow)  # the killed stage's own run, with what it logged
    assert stage["name"] == "pretrain" and stage["status"] == "FAILED" and stage["metrics"]["loss"] == 3.0
    new = client.get_run(parent.run_id)
    assert new.info.status == "FINISHED" and new.data.tags["lmforge.process"] == str(os.getpid())
    assert set(new.data.tags["lmforge.ended_abandoned"].split(",")) == {
        killed_flow, killed_stage, killed_alone, reused_pid, zombie_run}


def test_an_experiment_created_by_another_process_meanwhile_is_used_not_an_error():
    """Two flows on a team server look up a new experiment at once: both miss it, one creates it, and the
    other's create is refused with RESOURCE_ALREADY_EXISTS (seen on CI); the loser uses the winner's."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    class Racing:
        lookups = 0

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else SimpleNamespace(experiment_id="7", tags={})

        def create_experiment(self, name, artifact_location=None, tags=None):
            raise MlflowException(f"Experiment(name={name}) already exists", error_code=RESOURCE_ALREADY_EXISTS)

        def set_experiment_tag(self, experiment_id, key, value):
            pass

    assert tracking._experiment_id(Racing(), "team-concurrent") == "7"

    class Broken(Racing):
        def create_experiment(self, name, artifact_location=None, tags=None):
            raise MlflowException("database is down")

    with pytest.raises(MlflowException, match="database is down"):
        tracking._experiment_id(Broken(), "x")


def test_a_stage_run_on_its_own_ends_runs_a_killed_dvc_repro_left_running(store, monkeypatch):
    """Without a flow (plain `dvc repro`), the next stage run marks a dead process's RUNNING run FAILED as it
    connects; a live process's run stays."""
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "solo")
    client = tracking._client()
    exp = tracking._experiment_id(client, "solo")
    killed = client.create_run(exp, run_name="pretrain", tags=_dead_owner()).info.run_id
    live = client.create_run(exp, run_name="sft", tags=owners.owner_tags()).info.run_id
    with tracking.stage_run("pretrain", {"lr": 0.1}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert client.get_run(killed).info.status == "FAILED" and client.get_run(live).info.status == "RUNNING"
    assert "the next run marked it FAILED" in client.get_run(killed).data.tags[tracking.ABANDONED_TAG]
    [new] = [r for r in client.search_runs([exp]) if r.info.run_id not in (killed, live)]
    assert new.info.status == "FINISHED" and new.data.tags["lmforge.ended_abandoned"] == killed


FLOW = """
import os, signal, sys, time
from pathlib import Path
from lmforge import tracking
with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
    with tracking.stage_run("pretrain", {"lr": 0.1}) as t:
        t.log_metrics({"loss": 2.0}, step=1)
        Path(sys.argv[1]).write_text(parent.run_id)  # the writer has opened the flow's run
        time.sleep(1.5)  # the writer replays the stage's lines meanwhile
        os.kill(os.getpid(), signal.SIGKILL)  # the flow's process alone: its writer lives on
"""


def test_a_flow_killed_alone_has_its_runs_ended_failed_by_its_writer(store):
    """kill -9 of the flow's process (not its process group): the writer sees its flow gone, marks the flow's run and
    the open stage run FAILED with what they logged, and exits; nothing is left RUNNING for the next run to find."""
    marker = store / "run_id"
    assert subprocess.run([sys.executable, "-c", FLOW, str(marker)], cwd=ROOT, timeout=120).returncode == -9
    client, flow_id = tracking._client(), marker.read_text()
    deadline = time.monotonic() + 30
    while client.get_run(flow_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    [stage] = stage_runs(flow_id)
    assert client.get_run(flow_id).info.status == "FAILED" and stage["status"] == "FAILED"
    assert stage["metrics"]["loss"] == 2.0 and "the flow process" in stage["tags"][tracking.ABANDONED_TAG]
