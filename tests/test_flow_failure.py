"""A stage that fails under the flow: one `error:` line and no traceback, and its last good outputs back in the
workspace (DVC deletes them before it runs the command), with the summary saying so. A real git + DVC project
and the real flow CLI (its own Prefect server), on cheap stages: mix over a small local text source (and a tiny
pretrain for a flow killed with kill -9 mid-stage)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import commit_project

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


ENV = {**os.environ, "LMFORGE_TRACKING": "off", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _sh(cwd: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _params(notes: str) -> str:
    from lmforge.cli.preset import resolve

    data = {name: cfg.model_dump() for name, cfg in resolve("tiny", ROOT / "configs").items()}
    data["mix"]["sources"] = [{"name": "notes", "kind": "files", "path": notes}]
    return json.dumps(data, indent=1)  # JSON is YAML


@pytest.fixture()
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("tasks", "lmforge", "flows", "configs"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    notes = root / "notes"
    notes.mkdir()
    for i in range(30):
        (notes / f"note{i}.txt").write_text(f"Note {i}: the build reads the manifest and writes a report. " * (3 + i % 5))
    (root / "params.yaml").write_text(_params("notes"))
    return commit_project(root, _sh)


def test_a_failed_stage_says_so_in_one_line_and_its_previous_outputs_stand(project, tmp_path):
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect")}  # its own Prefect database
    _sh(project, sys.executable, "-m", "dvc", "repro", "mix")  # the last good outputs
    corpus, metrics = _digest(project / "out/mix/corpus"), (project / "out/mix/metrics.json").read_text()
    assert corpus and json.loads(metrics)

    (project / "params.yaml").write_text(_params("notes/missing.txt"))
    out = subprocess.run([sys.executable, "-m", "flows.lifecycle", "--root", str(project), "--stages", "mix"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, text
    assert len(errors) == 1 and "notes/missing.txt does not exist" in errors[0], text
    assert "Traceback" not in text
    assert _digest(project / "out/mix/corpus") == corpus  # restored from the DVC cache
    assert (project / "out/mix/metrics.json").read_text() == metrics  # uncached: kept aside, put back
    summary = (project / "out/summary.md").read_text()
    assert "| mix | **failed** (bad input)" in summary
    assert "the previous outputs of mix stand (restored from the DVC cache)" in summary
    assert "lifecycle: stage mix stopped on bad input" in out.stderr


def test_a_dvc_run_killed_with_sigkill_leaves_no_lock_that_blocks_the_next(project):
    """DVC's locks do not outlive a killed run: its repo lock is an OS file lock, and its per-path lock list names
    pids, which DVC checks for life (a dead one blocks nothing; lmforge's own flow lock: tests/test_lock.py)."""
    import signal
    import time

    import psutil

    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("stages:\n", "stages:\n  hang:\n    cmd: test -f go || sleep 60;"
                                                      " mkdir -p out/hang\n    deps: [notes]\n    outs: [out/hang]\n", 1))
    hung = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "hang"], cwd=project, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rwlock = project / ".dvc/tmp/rwlock"

    def running() -> bool:  # the stage's command started: DVC is done rewriting its lock file (a kill mid-rewrite
        # leaves it empty, as CI once saw)
        return any(c.name() == "sleep" for c in psutil.Process(hung.pid).children(recursive=True))

    deadline = time.monotonic() + 60
    while not (running() and rwlock.exists() and str(hung.pid) in rwlock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert str(hung.pid) in rwlock.read_text()  # it holds notes/ for reading, out/hang for writing
    os.killpg(hung.pid, signal.SIGKILL)  # kill -9 of the whole process group, no clean-up runs
    hung.wait()
    assert str(hung.pid) in rwlock.read_text()  # the dead run is still listed as writing out/hang...
    (project / "go").touch()
    _sh(project, sys.executable, "-m", "dvc", "repro", "hang")  # ...and blocks nothing: the same stage runs again
    assert (project / "out/hang").is_dir()


@pytest.mark.parametrize("text, message", [("pretrain:\n  lr: [0.1, 2\n  seed: 1\n", "params.yaml:3: not valid YAML"),
                                           ("", "params.yaml: empty"),
                                           ("pretrain:\n  lr: -1.0\n", "pretrain.lr: Input should be greater than 0"),
                                           (None, "unknown preset 'nope'")])
def test_the_flow_cli_reports_bad_params_in_one_line_before_prefect_starts(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text or "")
    preset = ["--preset", "nope"] if text is None else []
    out = subprocess.run([sys.executable, "-m", "flows.lifecycle", "--root", str(tmp_path), *preset], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def _logged(project: Path, metric: str) -> bool:
    """Whether the flow's writer has put `metric` of a running stage into MLflow (it lags the stage by <= 0.5 s)."""
    import sqlite3

    if not (project / "mlflow.db").exists():
        return False
    try:
        with sqlite3.connect(f"file:{project / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return bool(db.execute("select 1 from metrics where key = ?", (metric,)).fetchone())
    except sqlite3.Error:  # tables not made yet, or locked for a moment
        return False


@pytest.mark.slow  # ~45 s: two flow runs, each with its own Prefect server
def test_a_flow_killed_with_sigkill_mid_stage_completes_when_run_again(project, tmp_path):
    """kill -9 of the flow's whole process group (flow, Prefect, DVC, the stage) while pretrain trains, then the
    same command: the run completes (pretrain resumes from its checkpoint), no staging folder or lock is left,
    MLflow holds the killed attempt as FAILED runs (the flow's and the stage's, with what the flow's writer had
    put there; the next flow run ends them), none RUNNING, and the published model is bit-identical to an uninterrupted run's
    (metrics and curves equal but for timings)."""
    import signal
    import time

    data = json.loads(_params("notes"))
    data["pretrain"].update(max_steps=120, checkpoint_every=30, eval_every=60)
    (project / "params.yaml").write_text(json.dumps(data, indent=1))
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(LMFORGE_TRACKING="on", PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flows.lifecycle", "--root", str(project), "--stages", "pretrain"]

    with (tmp_path / "killed.log").open("w") as log:
        flow = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        checkpoint, deadline = project / "out/pretrain/checkpoints/last.pt", time.monotonic() + 240
        while not (checkpoint.exists() and _logged(project, "train_loss")) and flow.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = flow.poll() is None
        if alive:
            os.killpg(flow.pid, signal.SIGKILL)  # the whole process group, mid-stage: no clean-up runs anywhere
        flow.wait()
    killed = (tmp_path / "killed.log").read_text()
    assert alive and checkpoint.exists() and (project / "out/.pretrain.staging").is_dir(), killed  # killed training
    assert not (project / "out/pretrain/model").exists()

    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "pretrain: resumed from out/pretrain/checkpoints/last.pt at step " in text, text
    assert (project / "out/pretrain/model/model.safetensors").is_file() and not checkpoint.exists()
    assert not list(project.glob("out/.*.staging")) and not list(project.glob("out/*/.*.staging"))
    from flows.lock import lock_path, project_lock

    with project_lock(project, wait=False):  # no stale flow lock
        pass
    assert lock_path(project).read_text() == ""
    assert "up to date" in _sh(project, sys.executable, "-m", "dvc", "status", "pretrain")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    flows = sorted((r for r in runs if r.info.run_name == "lifecycle"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in flows] == ["FAILED", "FINISHED"]
    assert "lmforge.abandoned" in flows[0].data.tags
    stages = {(r.data.tags.get("mlflow.parentRunId"), r.info.run_name): r.info.status for r in runs
              if r.info.run_name != "lifecycle"}
    assert stages[(flows[0].info.run_id, "pretrain")] == "FAILED"  # the killed attempt, ended by the next flow run
    [killed] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == flows[0].info.run_id
                and r.info.run_name == "pretrain"]
    assert "lmforge.abandoned" in killed.data.tags  # what it logged before the kill stays:
    assert killed.data.params["max_steps"] == "120" and "train_loss" in killed.data.metrics
    assert stages[(flows[1].info.run_id, "pretrain")] == "FINISHED"
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]

    # what the killed-and-resumed run published equals what one uninterrupted run of the stage publishes
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "tasks.pretrain", "--corpus", "out/mix/corpus", "--tokenizer",
                    "out/tokenizer/tokenizer", "--out", str(whole)], cwd=project, check=True, timeout=300,
                   env={**env, "LMFORGE_TRACKING": "off"}, capture_output=True)
    published = project / "out/pretrain"
    for name in ("model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (published / name).read_bytes() == (whole / name).read_bytes(), name  # bit-identical
    same = lambda m: {k: v for k, v in m.items()  # noqa: E731 (all but timings and where it resumed)
                      if not (k.endswith("_s") or k == "resumed_from_step")}
    assert same(json.loads((published / "metrics.json").read_text())) == same(json.loads((whole / "metrics.json").read_text()))
    for curve in ("train.csv", "val.csv"):
        rows = [[same(r) for r in csv.DictReader((folder / "curves" / curve).open())] for folder in (published, whole)]
        assert rows[0] == rows[1], curve
