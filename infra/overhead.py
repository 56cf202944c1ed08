"""The team stack's cost over the embedded default: the same tiny lifecycle in two fresh copies of the project,
one with the embedded stores (SQLite MLflow, ephemeral Prefect), one against a running stack (`python -m infra
up` first) with `--push team`; prints the seconds and their ratio.

    python -m infra.overhead [--folder STACK]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra import credentials
from infra.stack import ROOT, Stack, remote


def project(dest: Path) -> Path:
    for folder in ("tasks", "lmforge", "flows", "configs"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "lmforge.cli.preset", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def timed(cwd: Path, env: dict[str, str], *extra: str) -> float:
    """Seconds of one flow run; `env` on top of ours, without any stack variables we might carry."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "flows.lifecycle", *extra], cwd=cwd, check=True,
                   env={**base, "LMFORGE_TRACKING": "on", **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", help="the running stack's folder (default: LMFORGE_STACK or infra/.stack)")
    stack = Stack.at(ap.parse_args().folder)
    with tempfile.TemporaryDirectory(prefix="lmforge-overhead-") as tmp:
        local, team = project(Path(tmp) / "embedded"), project(Path(tmp) / "team")
        remote(stack, team)
        embedded_s = timed(local, {})
        team_s = timed(team, stack.client_env(credentials.credentials(stack.root)), "--push", "team")
    print(f"tiny lifecycle: embedded {embedded_s:.1f} s, team stack {team_s:.1f} s, ratio {team_s / embedded_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
