"""The MLflow seam against a real SQLite store in a temp folder."""

import pytest

from tasks import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_PARENT_RUN_ID", raising=False)
    return tmp_path


def test_flow_run_nests_stage_runs_with_params_metrics_artifacts(store):
    (store / "samples.txt").write_text("hello")
    with tracking.flow_run("lifecycle", "exp", {"preset": "tiny"}) as parent:
        tracking.nest_children(parent)
        with tracking.stage_run("pretrain", {"lr": 0.1, "sources": [{"name": "a"}]}) as t:
            t.log_metrics({"loss": 2.0}, step=1)
            t.log_metrics({"loss": 1.0, "nested": {"x": 3}}, step=2)
            t.log_artifact(store / "samples.txt")
        tracking.tag_child(parent.run_id, "pretrain", {"dvc.lock_md5": "abc"})
    children = tracking.stage_runs(parent.run_id)
    assert [c["name"] for c in children] == ["pretrain"]
    child = children[0]
    assert child["status"] == "FINISHED" and child["metrics"]["loss"] == 1.0 and child["metrics"]["nested.x"] == 3
    assert child["tags"]["dvc.lock_md5"] == "abc"
    assert (store / "mlflow.db").exists()
    assert list((store / "mlartifacts").rglob("samples.txt"))
    assert "LMFORGE_PARENT_RUN_ID" not in __import__("os").environ


def test_failed_stage_is_marked_failed(store):
    with tracking.flow_run("lifecycle", "exp", {}) as parent:
        tracking.nest_children(parent)
        with pytest.raises(RuntimeError):
            with tracking.stage_run("mix", {}):
                raise RuntimeError("boom")
    assert tracking.stage_runs(parent.run_id)[0]["status"] == "FAILED"


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
