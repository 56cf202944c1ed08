"""python docs/findings/smollm2/collect_run.py PROJECT TIME_FILE OUT [NOTE]: keep one finished run of the
lifecycle as a record: its report card and plots (out/report), the flow's summary, the evaluate table, each
stage's metrics, the seeds the stages ran with, and machine.json (this machine, the run's commit and its wall
time as `/usr/bin/time -v` wrote it in TIME_FILE)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the project root: bench.machine


def wall_seconds(time_file: Path) -> int:
    """`Elapsed (wall clock) time (h:mm:ss or m:ss): 52:41.33` in seconds."""
    found = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", time_file.read_text())
    if not found:
        raise SystemExit(f"{time_file}: no 'Elapsed (wall clock) time' line; is it /usr/bin/time -v output?")
    seconds = 0.0
    for part in found.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return round(seconds)


def main(project: Path, time_file: Path, out: Path, note: str = "") -> None:
    from bench.machine import describe

    run = project / "out"
    out.mkdir(parents=True, exist_ok=True)
    for item in (run / "report").iterdir():
        shutil.copy2(item, out / item.name)
    shutil.copy2(run / "summary.md", out / "summary.md")
    shutil.copy2(run / "evaluate" / "table.md", out / "evaluate-table.md")
    metrics = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("*/metrics.json"))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    seeds = {stage: {k: v for k, v in section.items() if k.endswith("seed")}
             for stage, section in params.items() if isinstance(section, dict)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True,
                            text=True).stdout.strip()
    record = dict(describe(), commit=commit, flow_wall_s=wall_seconds(time_file),
                  seeds={k: v for k, v in seeds.items() if v}, note=note)
    (out / "machine.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    shutil.copy2(time_file, out / "time.txt")
    print(f"wrote {out}: flow {record['flow_wall_s']} s at {commit}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), " ".join(sys.argv[4:]))
