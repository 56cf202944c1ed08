"""ppo stage on the tiny random Llama: a few PPO updates, curves, before/after metrics, the quality gate."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lmforge.data import posttrain_data
from tasks import ppo
from lmforge.errors import ConfigError
from lmforge.config import PpoConfig, parse_section
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute, read_json
from lmforge.tracking import NullTracker

TINY = dict(train_prompts=16, test_prompts=8, steps=3, batch_size=4, mini_batches=2, ppo_epochs=1,
            response_length=4, lr=1e-3, eval_batch_size=8)


class Recorder(NullTracker):
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def reward_dir(tiny_reward_dir):
    return tiny_reward_dir


@pytest.fixture(scope="module")
def trained(tiny_model_dir, reward_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "ppo"
    cfg = PpoConfig(**TINY, min_reward_accuracy=0.8)
    tracker = Recorder()
    metrics = execute("ppo", ppo.run, cfg, out, {"policy": tiny_model_dir, "reward_model": reward_dir},
                      tracker=tracker)
    return out, metrics, tracker


def test_metrics_and_curves(trained):
    out, metrics, tracker = trained
    for key in ("rm_score", "gt_accuracy", "end_rate"):
        assert math.isfinite(metrics[key]) and math.isfinite(metrics[f"{key}_before"])
    assert metrics["reward_accuracy_gate"] == 0.9 and metrics["weights_changed"] is True
    assert set(metrics["gt_accuracy_by_task"]) == set(posttrain_data.TASKS)
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for col in ("rm_score", "kl", "entropy", "clipfrac", "value_loss"):
        assert all(math.isfinite(float(r[col])) for r in rows), col
    assert (out / "samples.jsonl").read_text().count("\n") == 8
    logged = {step: m for step, m in tracker.logged if step and "rollout/kl" in m}
    assert sorted(logged) == [1, 2, 3] and all("rollout/value_loss" in m for m in logged.values())
    assert read_json(out / "model" / META_FILE)["metrics"]["rm_score"] == metrics["rm_score"]


def test_policy_saved_loads_and_changed(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template and tok.eos_token == "<|endoftext|>"  # the stage's tokenizer, not TRL's copy
    assert policy.generation_config.eos_token_id == start.generation_config.eos_token_id  # TRL's override undone
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))


def test_gate_refuses_weak_reward_model(tiny_model_dir, reward_dir, tmp_path):
    cfg = PpoConfig(**TINY, min_reward_accuracy=0.95)
    with pytest.raises(InputError, match=r"accuracy 0\.900, below ppo\.min_reward_accuracy=0\.95"):
        ppo.run(cfg, policy=tiny_model_dir, reward_model=reward_dir, out=tmp_path, tracker=NullTracker())


def test_gate_needs_meta(tiny_model_dir, tmp_path):
    (tmp_path / "rm").mkdir()
    cfg = PpoConfig(**TINY, min_reward_accuracy=0.5)
    with pytest.raises(InputError, match="lmforge.json: missing"):
        ppo.run(cfg, policy=tiny_model_dir, reward_model=tmp_path / "rm", out=tmp_path, tracker=NullTracker())


def test_cli_exit_code_on_gate(tiny_model_dir, reward_dir, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("ppo:\n  min_reward_accuracy: 0.99\n")
    code = ppo.main(["--params", str(params), "--policy", str(tiny_model_dir), "--reward-model", str(reward_dir),
                     "--out", str(tmp_path / "out")])
    assert code == 2 and "min_reward_accuracy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model").exists()


def test_config_checks_minibatch_split():
    with pytest.raises(ConfigError, match="multiple of mini_batches"):
        parse_section("ppo", {"batch_size": 6, "mini_batches": 4})
