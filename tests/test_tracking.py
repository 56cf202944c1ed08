"""The MLflow seam against a real SQLite store in a temp folder."""

import pytest

from lmforge import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LMFORGE_TRACKING_JOURNAL", raising=False)
    return tmp_path


def test_flow_run_nests_stage_runs_with_params_metrics_artifacts(store, monkeypatch):
    (store / "samples.txt").write_text("hello")
    with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
        journal = __import__("os").environ["LMFORGE_TRACKING_JOURNAL"]
        assert parent.run_id  # connected
        # what a stage process does under the flow: no MLflow connection, its calls go to the journal
        with monkeypatch.context() as patch:
            patch.setattr(tracking, "_connect", lambda *a: pytest.fail("a stage under a flow connected to MLflow"))
            with tracking.stage_run("pretrain", {"lr": 0.1, "sources": [{"name": "a"}]}) as t:
                assert isinstance(t, tracking.JournalTracker)
                t.log_metrics({"loss": 2.0}, step=1)
                t.log_metrics({"loss": 1.0, "nested": {"x": 3}}, step=2)
                t.log_artifact(store / "samples.txt")
        (store / "samples.txt").unlink()  # the stage moved its outputs: the journal kept a copy
        tracking.nest_stage_runs(parent, "pretrain", {"dvc.lock_md5": "abc"})
    children = tracking.stage_runs(parent.run_id)
    assert [c["name"] for c in children] == ["pretrain"]
    child = children[0]
    assert child["status"] == "FINISHED" and child["metrics"]["loss"] == 1.0 and child["metrics"]["nested.x"] == 3
    assert child["tags"]["dvc.lock_md5"] == "abc" and child["tags"]["lmforge.stage"] == "pretrain"
    client = tracking._client()
    run_id = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                "tags.`lmforge.stage` = 'pretrain'")[0].info.run_id
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [
        (1, 2.0), (2, 1.0)]
    assert client.get_run(run_id).data.params["sources.0.name"] == "a"
    assert (store / "mlflow.db").exists()
    assert list((store / "mlartifacts").rglob("samples.txt"))
    assert "LMFORGE_TRACKING_JOURNAL" not in __import__("os").environ
    assert not __import__("pathlib").Path(journal).exists()  # replayed and removed


def test_failed_stage_is_marked_failed(store):
    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        with pytest.raises(RuntimeError):
            with tracking.stage_run("mix", {}):
                raise RuntimeError("boom")
        # a killed process leaves a journal without its end record, maybe with half a line
        killed = tracking.JournalTracker(__import__("pathlib").Path(__import__("os").environ["LMFORGE_TRACKING_JOURNAL"]),
                                         "mix", {"lmforge.stage": "mix"})
        killed._fh.write('{"op": "metr')
        killed._fh.close()
        tracking.nest_stage_runs(parent, "mix", {"dvc.lock_md5": "abc"})
    runs = tracking.stage_runs(parent.run_id)
    assert [r["status"] for r in runs] == ["FAILED", "FAILED"]
    assert not any("dvc.lock_md5" in r["tags"] for r in runs)  # the hash describes a finished attempt only


def test_a_stage_alone_is_a_top_level_run(store):
    with tracking.stage_run("mix", {"a": 1}) as t:
        assert isinstance(t, tracking.BackgroundTracker)
        t.log_metrics({"docs": 3.0})
    run = tracking._client().get_run(t.run_id)
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags and run.data.metrics["docs"] == 3.0


def test_off_switch_gives_null_tracker(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_TRACKING", "off")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    with tracking.stage_run("mix", {"a": 1}) as t:
        assert isinstance(t, tracking.NullTracker)
    assert not (tmp_path / "mlflow.db").exists()


def test_logging_does_not_wait_for_mlflow_and_keeps_call_order(store, monkeypatch):
    """The stage goes on while the worker connects; the run still gets every metric, in order."""
    import threading

    gate = threading.Event()
    connect = tracking._connect
    monkeypatch.setattr(tracking, "_connect", lambda *a: (gate.wait(), connect(*a))[1])
    with tracking.stage_run("pretrain", {"lr": 0.1}) as t:
        for step in range(5):
            t.log_metrics({"loss": 5.0 - step}, step=step)  # returns at once: the worker is still connecting
        gate.set()
    run = tracking._client().get_run(t.run_id)
    history = tracking._client().get_metric_history(t.run_id, "loss")
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 5.0 - s) for s in range(5)]


def test_a_tracking_failure_is_reported_and_the_stage_error_wins(store, monkeypatch):
    def broken(*args):
        raise ConnectionError("no server at http://nowhere")

    monkeypatch.setattr(tracking, "_connect", broken)
    with pytest.raises(RuntimeError, match="no server"):
        with tracking.stage_run("mix", {}) as t:
            t.log_artifact(store)  # the first wait surfaces the failure
    with pytest.raises(ValueError, match="the stage's own"):
        with tracking.stage_run("mix", {}):
            raise ValueError("the stage's own error")


def test_prewarmed_tracker_serves_the_flow_run_and_a_discarded_one_makes_no_run(store):
    tracking.prewarm(store, "exp")
    tracking.prewarm(store, "exp")  # once per project and experiment
    assert len(tracking._warm) == 1
    warm = next(iter(tracking._warm.values()))
    with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
        assert parent is warm and not tracking._warm
        parent.log_metrics({"mix.seconds": 1.5})
    client = tracking._client()
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"mix.seconds": 1.5}
    tracking.prewarm(store, "exp")
    unused = next(iter(tracking._warm.values()))
    tracking.discard_prewarmed()
    assert unused._proc.wait(60) == 0 and not tracking._warm  # it ends by itself
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracking_process_failures_surface_at_the_waits(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(RuntimeError, match="nosuchscheme"):
        with tracking.flow_run("lifecycle", "exp", {}):
            pass
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RuntimeError, match="process exited"):
        with tracking.flow_run("lifecycle", "exp", {}) as parent:
            parent._proc.kill()
            parent._proc.wait()
            parent.log_artifact(store / "mlflow.db")


def test_replay_batches_many_steps(store):
    """A long stage's journal (thousands of metric values) lands whole, in a few commits."""
    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        with tracking.stage_run("pretrain", {"lr": 0.1}) as t:
            for step in range(1500):
                t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracking.nest_stage_runs(parent, "pretrain")
    (child,) = tracking.stage_runs(parent.run_id)
    history = tracking._client().get_metric_history(
        tracking._client().search_runs([tracking._client().get_run(parent.run_id).info.experiment_id],
                                       "tags.mlflow.runName = 'pretrain'")[0].info.run_id, "loss")
    assert child["status"] == "FINISHED" and len(history) == 1500


def test_runs_left_running_by_a_dead_process_are_marked_failed_by_the_next_flow_run(store, tmp_path):
    """kill -9 leaves a run RUNNING that its dead owner will never end; the next flow run ends it FAILED, with the
    killed stage's journal replayed under it. A live owner's run, another host's, or one with no owner tags stay."""
    import os
    import socket
    import subprocess
    import sys

    client = tracking._client()
    exp = tracking._experiment_id(client, "exp")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(gone.pid), tracking.PID_START_TAG: "1"}
    journal = tmp_path / "journal-of-the-killed-flow"
    journal.mkdir()
    killed_stage = tracking.JournalTracker(journal, "pretrain", {"lmforge.stage": "pretrain"})
    killed_stage.log_metrics({"loss": 3.0}, step=5)  # then kill -9: no "end" record

    def run(name, tags):
        return client.create_run(exp, run_name=name, tags=tags).info.run_id

    killed_flow = run("lifecycle", {**dead, tracking.JOURNAL_TAG: str(journal)})
    killed_alone = run("mix", dead)  # a `dvc repro` killed on its own
    reused_pid = run("sft", {**tracking.owner_tags(), tracking.PID_START_TAG: "0"})  # our pid, another process's start
    live = run("tokenizer", tracking.owner_tags())
    elsewhere = run("lora", {**dead, tracking.HOST_TAG: "another-host"})
    untagged = run("grpo", {})

    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        assert parent.run_id
    status = {r: client.get_run(r).info.status for r in (killed_flow, killed_alone, reused_pid, live, elsewhere, untagged)}
    assert status == {killed_flow: "FAILED", killed_alone: "FAILED", reused_pid: "FAILED", live: "RUNNING",
                      elsewhere: "RUNNING", untagged: "RUNNING"}
    assert f"pid {gone.pid}" in client.get_run(killed_flow).data.tags[tracking.ABANDONED_TAG]
    [stage] = tracking.stage_runs(killed_flow)  # the killed stage's own run, from its journal
    assert stage["name"] == "pretrain" and stage["status"] == "FAILED" and stage["metrics"]["loss"] == 3.0
    assert not journal.exists()
    new = client.get_run(parent.run_id)
    assert new.info.status == "FINISHED" and new.data.tags[tracking.PID_TAG] != str(os.getpid())  # its tracking process
    assert set(new.data.tags["lmforge.ended_abandoned"].split(",")) == {killed_flow, killed_alone, reused_pid}


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
            return None if self.lookups == 1 else SimpleNamespace(experiment_id="7")

        def create_experiment(self, name, artifact_location=None):
            raise MlflowException(f"Experiment(name={name}) already exists", error_code=RESOURCE_ALREADY_EXISTS)

    assert tracking._experiment_id(Racing(), "team-concurrent") == "7"

    class Broken(Racing):
        def create_experiment(self, name, artifact_location=None):
            raise MlflowException("database is down")

    with pytest.raises(MlflowException, match="database is down"):
        tracking._experiment_id(Broken(), "x")


def test_a_stage_run_on_its_own_ends_runs_a_killed_dvc_repro_left_running(store, monkeypatch):
    """Without a flow (plain `dvc repro`), the next stage run marks a dead process's RUNNING run FAILED as it
    connects; a live process's run stays."""
    import socket
    import subprocess
    import sys

    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "solo")
    client = tracking._client()
    exp = tracking._experiment_id(client, "solo")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(gone.pid), tracking.PID_START_TAG: "1"}
    killed = client.create_run(exp, run_name="pretrain", tags=dead).info.run_id
    live = client.create_run(exp, run_name="sft", tags=tracking.owner_tags()).info.run_id
    with tracking.stage_run("pretrain", {"lr": 0.1}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert client.get_run(killed).info.status == "FAILED" and client.get_run(live).info.status == "RUNNING"
    assert "the next run marked it FAILED" in client.get_run(killed).data.tags[tracking.ABANDONED_TAG]
    [new] = [r for r in client.search_runs([exp]) if r.info.run_id not in (killed, live)]
    assert new.info.status == "FINISHED" and new.data.tags["lmforge.ended_abandoned"] == killed
