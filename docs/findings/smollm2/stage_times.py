"""python docs/findings/smollm2/stage_times.py PROJECT: when each stage of the project's newest lifecycle run
started and ended (seconds from the flow's start, from its MLflow store), and the wall time of the stages that
ran side by side (ppo, dpo, grpo) against the sum of their own times."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient


def main(project: Path) -> dict:
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    flows = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
             if r.info.run_name == "lifecycle"]
    flow = max(flows, key=lambda r: r.info.start_time)
    stages = client.search_runs([flow.info.experiment_id], f"tags.mlflow.parentRunId = '{flow.info.run_id}'")
    t0 = flow.info.start_time
    times = {r.info.run_name: [(r.info.start_time - t0) / 1000, (r.info.end_time - t0) / 1000]
             for r in sorted(stages, key=lambda r: r.info.start_time)}
    side = [times[s] for s in ("ppo", "dpo", "grpo") if s in times]
    report = {"flow_run": flow.info.run_id, "flow_s": (flow.info.end_time - t0) / 1000, "stages": times}
    if side:
        report["side_by_side"] = {"wall_s": max(e for _, e in side) - min(s for s, _ in side),
                                  "sum_of_stages_s": sum(e - s for s, e in side)}
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
