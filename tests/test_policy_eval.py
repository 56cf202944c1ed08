"""The alignment stages' held-out measurement of their starting policy: computed once per content, then read back."""

from __future__ import annotations

import json
import shutil

import torch

from lmforge.data import posttrain_data
from lmforge.models import load_tokenizer
from lmforge.training import policy_eval
from lmforge.training.policy_eval import load_models, measure, measure_start


def test_the_starting_policy_is_measured_once_per_content(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    generated = []
    replies = policy_eval.replies
    monkeypatch.setattr(policy_eval, "replies", lambda *a, **k: generated.append(1) or replies(*a, **k))
    tok = load_tokenizer(tiny_model_dir)
    model, _, rm = load_models(tiny_model_dir, tiny_reward_dir, tok.pad_token_id, torch.device("cpu"))
    rows = posttrain_data.prompts("test", 6, 0)
    settings = dict(batch_size=4, max_new_tokens=3, reward_model=rm, suffix="_before")

    first = measure_start(tiny_model_dir, tiny_reward_dir, model, tok, rows, **settings)
    assert len(generated) == 1  # the replies were generated
    assert json.loads(json.dumps(measure(model, tok, rows, **settings))) == list(first)  # what measure gives
    assert len(generated) == 2
    assert measure_start(tiny_model_dir, tiny_reward_dir, model, tok, rows, **settings) == first
    assert len(generated) == 2  # read back: no reply generated
    assert len(list((tmp_path / "cache/policy-eval").glob("*.json"))) == 1

    # anything it reads changed: measured again
    measure_start(tiny_model_dir, tiny_reward_dir, model, tok, rows, **{**settings, "max_new_tokens": 2})
    measure_start(tiny_model_dir, tiny_reward_dir, model, tok, rows[:5], **settings)
    other = shutil.copytree(tiny_model_dir, tmp_path / "policy")
    (other / "generation_config.json").write_text((other / "generation_config.json").read_text() + "\n")
    measure_start(other, tiny_reward_dir, model, tok, rows, **settings)
    assert len(generated) == 2 + 3
    assert len(list((tmp_path / "cache/policy-eval").glob("*.json"))) == 4
