"""One alignment stage (or distill) of a finished run again with changed knobs, its metrics printed:
python docs/findings/smollm2/one_stage.py PROJECT STAGE OUT key=value ... > STAGE-CHANGE.txt
(inputs as dvc.yaml names them for that stage; the project's params.yaml section with the changes)."""
import json, sys
from pathlib import Path
import yaml
from lmforge.config import load_params, parse_section
from lmforge.stage import execute
from lmforge.tracking import NullTracker
import importlib

root, stage, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
knobs = load_params(root / "params.yaml")[stage].model_dump()
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1)
    knobs[k] = yaml.safe_load(v)
cfg = parse_section(stage, knobs)
module = importlib.import_module(f"tasks.{stage}")
inputs = {"ppo": {"policy": root / "out/sft/model", "reward_model": root / "out/reward/model"},
          "grpo": {"policy": root / "out/sft/model", "reward_model": root / "out/reward/model"},
          "dpo": {"policy": root / "out/sft/model", "reward_model": root / "out/reward/model"},
          "distill": {"corpus": root / "out/mix/corpus"}}[stage]
m = execute(stage, module.run, cfg, out, inputs, tracker=NullTracker())
print(json.dumps({k: v for k, v in m.items() if not isinstance(v, (list,))}, default=str)[:3000])
