"""How long the alignment stages' held-out measurement of their starting policy takes on a finished smollm2 run, computed
and then read back from lmforge's cache: python docs/findings/smollm2/start_measure.py PROJECT > start-measure.json
(PROJECT: the folder the flow ran in; LMFORGE_CACHE set to an empty folder, so the first call computes)."""
import json
import sys
import time
from pathlib import Path

import torch

from lmforge.data import posttrain_data
from lmforge.models import load_tokenizer
from lmforge.training.policy_eval import load_models, measure_start

out = Path(sys.argv[1]) / "out"
tok = load_tokenizer(out / "sft/model")
model, _, rm = load_models(out / "sft/model", out / "reward/model", tok.pad_token_id, torch.device("cpu"))
test = posttrain_data.prompts("test", 200, 0)  # ppo's, dpo's and grpo's held-out prompts at seed 0
seconds = {}
for name in ("computed", "read back"):
    t = time.perf_counter()
    m, _ = measure_start(out / "sft/model", out / "reward/model", model, tok, test, batch_size=50, max_new_tokens=8,
                         reward_model=rm, suffix="_before")
    seconds[name] = round(time.perf_counter() - t, 2)
print(json.dumps({"seconds": seconds, "gt_accuracy_before": m["gt_accuracy_before"], "torch_threads": torch.get_num_threads()}))
