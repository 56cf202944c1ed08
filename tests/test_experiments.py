"""Parallel experiments are DVC's queue: each runs in its own temporary workspace from a fresh checkout, so every
declared output must exist after any valid config. The case a user hit: a queued `pretrain.max_steps` at or below
`pretrain.checkpoint_every` (no checkpoint written) once failed with "output 'out/pretrain/checkpoints' does not
exist". A real git + DVC project on the tiny preset (shortened), two experiments queued, run two at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import commit_project

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ENV = {**os.environ, "LMFORGE_TRACKING": "off", "OMP_NUM_THREADS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _sh(cwd: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_queued_experiments_run_in_their_own_workspaces(tmp_path):
    from lmforge.cli.preset import render, resolve

    root = tmp_path / "project"
    for folder in ("tasks", "lmforge", "configs"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    configs = resolve("tiny", ROOT / "configs")
    configs["mix"] = configs["mix"].model_copy(update={"budget_chars": 40000, "arithmetic_docs": 300})
    configs["pretrain"] = configs["pretrain"].model_copy(update={"max_steps": 12, "eval_every": 6, "checkpoint_every": 30})
    (root / "params.yaml").write_text(render("tiny", configs))  # as a user's params.yaml looks: `dvc exp -S` edits it
    commit_project(root, _sh)

    # at or below checkpoint_every (no checkpoint is ever written), and above it
    _sh(root, sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", "short", "-S", "pretrain.max_steps=8", "pretrain")
    _sh(root, sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", "long", "-S", "pretrain.max_steps=34",
        "-S", "pretrain.checkpoint_every=16", "pretrain")
    _sh(root, sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", "2")

    shown = json.loads(_sh(root, sys.executable, "-m", "dvc", "exp", "show", "--json"))
    runs = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in e["revs"]}
    assert {"short", "long"} <= set(runs), runs.keys()
    for name, steps in (("short", 8), ("long", 34)):
        data = runs[name]["data"]
        params = data["params"]["params.yaml"]["data"]["pretrain"]
        metrics = data["metrics"]["out/pretrain/metrics.json"]["data"]
        assert params["max_steps"] == steps, (name, params)
        assert metrics["tokens_seen"] == steps * params["batch_size"] * params["seq_len"], (name, metrics)
        assert metrics["final_val_loss"] < metrics["initial_val_loss"]
    assert not (root / "out").exists()  # the workspace itself ran nothing
