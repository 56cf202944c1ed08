"""dvc.yaml and params.yaml agree: nine stages, one params section each, named alike everywhere."""

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_valid_and_names_the_nine_stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.name: s for s in repo.index.stages}
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage.cmd.startswith(f"python -m tasks.{name} "), stage.cmd
        assert (ROOT / "tasks" / f"{name}.py").exists()
        params = [p for dep in stage.deps if hasattr(dep, "params") for p in dep.params]
        assert params == [name], f"{name} should depend on its own params section, got {params}"
        assert any(str(o.def_path).endswith(f"out/{name}/metrics.json") for o in stage.outs), name


@pytest.mark.slow
def test_every_stage_command_has_help():
    # all at once: each interpreter spends its seconds importing, so they overlap on the cores
    procs = {name: subprocess.Popen([sys.executable, "-m", f"tasks.{name}", "--help"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in STAGES}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "--out" in out, (name, err[-500:])
