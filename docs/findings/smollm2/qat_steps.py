"""quantize's rtn and qat on a finished smollm2 run's lora policy, the preset's knobs but qat_steps:
python docs/findings/smollm2/qat_steps.py PROJECT STEPS OUT > qat-STEPS.txt"""
import json
import sys
from pathlib import Path

from lmforge.config import load_params, parse_section
from lmforge.stage import execute
from lmforge.tracking import NullTracker
from tasks import quantize

root, steps = Path(sys.argv[1]), int(sys.argv[2])
knobs = {**load_params(root / "params.yaml")["quantize"].model_dump(), "methods": ["rtn", "qat"], "qat_steps": steps,
         "model": "lora"}
m = execute("quantize", quantize.run, parse_section("quantize", knobs), Path(sys.argv[3]),
            {"model": root / "out/lora/model", "corpus": root / "out/mix/corpus"}, tracker=NullTracker())
keep = ("perplexity", "loss_vs_rtn", "qat_s", "qat_kl_first", "qat_kl_last", "quantize_s")
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in keep} for k, v in m.items() if isinstance(v, dict)}))
print("wall", m["wall_time_s"])
