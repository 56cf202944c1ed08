"""The preset's wall time from a flow run that re-ran only the stages a change touched: that run's wall time
(/usr/bin/time -v) plus, for each stage it skipped, the seconds of the run that made its outputs.
python docs/findings/smollm2/composite_time.py FIRST_SUMMARY RERUN_SUMMARY RERUN_TIME > composite-time.json"""
import json
import re
import sys
from pathlib import Path


def stages(summary: str) -> dict[str, tuple[str, float]]:
    rows = re.findall(r"^\| (\w+) \| (ran|skipped) \| ([0-9.]+) \|", Path(summary).read_text(), flags=re.M)
    return {name: (status, float(seconds)) for name, status, seconds in rows}


first, rerun = stages(sys.argv[1]), stages(sys.argv[2])
h, m, s = ([0] * 3 + re.search(r"Elapsed \(wall clock\) time.*: ([0-9:.]+)", Path(sys.argv[3]).read_text()).group(1).split(":"))[-3:]
wall = int(h) * 3600 + int(m) * 60 + float(s)
skipped = {name: first[name][1] for name, (status, _) in rerun.items() if status == "skipped"}
print(json.dumps({"rerun_wall_s": round(wall), "rerun_ran": [n for n, (st, _) in rerun.items() if st == "ran"],
                  "skipped_first_run_s": skipped, "preset_wall_s": round(wall + sum(skipped.values())),
                  "rerun_stage_s": {n: sec for n, (st, sec) in rerun.items() if st == "ran"}}, indent=1))
