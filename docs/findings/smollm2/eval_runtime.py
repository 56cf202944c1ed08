"""The held-out loss evaluations sft and lora ran, from a finished run's MLflow store (step, seconds):
python docs/findings/smollm2/eval_runtime.py PROJECT > eval-runtime.json"""
import json
import sqlite3
import sys
from pathlib import Path

db = sqlite3.connect(Path(sys.argv[1]) / "mlflow.db")
rows = db.execute("select r.name, m.step, m.value from metrics m join runs r on r.run_uuid = m.run_uuid "
                  "where m.key = 'eval/runtime' and r.name in ('sft', 'lora') order by r.name, m.step, m.timestamp").fetchall()
print(json.dumps({stage: [[step, round(s, 2)] for name, step, s in rows if name == stage] for stage in ("sft", "lora")}))
