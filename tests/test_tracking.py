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
