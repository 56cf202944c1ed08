"""`make ui`: MLflow's UI on the embedded store (mlflow.db, artifacts beside it), with the address that opens the
lmforge experiment on its training runs.

MLflow 3's UI opens every experiment on its GenAI overview (traces, token usage) unless the address asks for the
model-training view (`workflowType=machine_learning`); the experiment's `mlflow.experimentKind` tag alone does not
switch it. So the address printed here asks for it, and every page the UI links from there keeps it.

    python -m lmforge.cli.ui [--host 127.0.0.1] [--port 5000] [--experiment lmforge]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from lmforge.registry import POLICY

VIEW = "workflowType=machine_learning"


def experiment_id(db: Path, name: str) -> str | None:
    """The experiment's id in the embedded store, read with sqlite3 (no MLflow import), or None."""
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        try:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error:  # not (yet) an MLflow store
            return None
    return str(row[0]) if row else None


def addresses(base: str, db: Path, name: str) -> dict[str, str]:
    """The pages worth opening: the experiment's runs table (model-training view) and the registered policy."""
    exp = experiment_id(db, name)
    runs = f"{base}/#/experiments/{exp}/runs?{VIEW}" if exp else f"{base}/#/experiments?{VIEW}"
    return {"runs": runs, "registry": f"{base}/#/models/{POLICY}?{VIEW}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.cli.ui", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: only this machine)")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--experiment", default="lmforge", help="the experiment whose runs to link")
    ap.add_argument("--root", default=".", help="project folder (holds mlflow.db)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    db = root / "mlflow.db"
    pages = addresses(f"http://{args.host}:{args.port}", db, args.experiment)
    if not db.exists():
        print(f"no runs yet in {db}: `make run` first; the UI starts empty", file=sys.stderr)
    print(f"lmforge runs:     {pages['runs']}\nlmforge registry: {pages['registry']}", flush=True)
    mlflow = Path(sys.executable).parent / "mlflow"
    os.chdir(root)
    os.execv(str(mlflow), [str(mlflow), "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--host", args.host,
                           "--port", str(args.port)])
    return 0  # not reached: the UI server replaces this process


if __name__ == "__main__":
    sys.exit(main())
