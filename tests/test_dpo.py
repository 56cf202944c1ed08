"""dpo stage on the tiny random Llama with TRL's real DPOTrainer: before/after metrics, the saved policy, user data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks import dpo
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.config import DpoConfig
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute, read_json
from lmforge.tracking import NullTracker

TINY = dict(train_pairs=32, test_pairs=8, test_prompts=8, max_steps=6, batch_size=8, lr=3e-3, warmup_steps=0,
            log_every=1, eval_batch_size=8, max_new_tokens=4)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_reward_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "dpo"
    metrics = execute("dpo", dpo.run, DpoConfig(**TINY), out, {"policy": tiny_model_dir, "reward_model": tiny_reward_dir},
                      tracker=NullTracker())
    return out, metrics


def test_metrics(trained):
    out, metrics = trained
    for key in ("gt_accuracy", "rm_score", "pref_accuracy", "end_rate"):
        assert math.isfinite(metrics[key]) and math.isfinite(metrics[f"{key}_before"]), key
    assert 0 <= metrics["pref_accuracy"] <= 1 and 0 <= metrics["implicit_reward_accuracy"] <= 1
    assert math.isfinite(metrics["implicit_reward_margin"])
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.01  # it learns the training pairs
    assert metrics["kl_ref"] > 0 and metrics["steps"] == 6
    # at the start: DPO's -log sigmoid(0) plus the chosen reply's NLL under a near-uniform random model (300 tokens)
    assert metrics["train_loss_first"] == pytest.approx(math.log(2) + math.log(300), abs=0.3)
    assert set(metrics["gt_accuracy_by_task"]) == set(posttrain_data.TASKS)
    assert (out / "samples.jsonl").read_text().count("\n") == 8
    assert read_json(out / "model" / META_FILE)["metrics"]["pref_accuracy"] == metrics["pref_accuracy"]


def test_policy_saved_loads_and_changed(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out / "model").chat_template
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))
    assert not (out / resume.TRAINER_TMP).exists()


def test_user_pairs_and_bad_rows(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}) + "\n")
    rows = dpo.training_pairs(DpoConfig(train_pairs=0, data_files=[str(good)]))
    assert rows == [{"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi"}],
                     "rejected": [{"role": "assistant", "content": "bye"}]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Say hi", "chosen": "hi"}) + "\n")
    with pytest.raises(InputError, match=r'bad\.jsonl:1: missing "rejected"'):
        dpo.training_pairs(DpoConfig(data_files=[str(bad)]))
    with pytest.raises(InputError, match="no training pairs"):
        dpo.training_pairs(DpoConfig(train_pairs=0))
