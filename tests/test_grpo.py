"""grpo stage: the verifiable reward on right, wrong and malformed replies, and TRL's real GRPOTrainer on the tiny Llama."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tasks import grpo
from lmforge.data import posttrain_data
from lmforge.errors import ConfigError
from lmforge.config import GrpoConfig, parse_section
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute, read_json
from lmforge.tracking import NullTracker

# a random model never answers right nor ends its turn, so only the reward model's score moves it here
TINY = dict(train_prompts=16, test_prompts=8, max_steps=3, prompts_per_step=2, group_size=4, response_length=4,
            lr=1e-3, warmup_steps=0, log_every=1, eval_batch_size=8, reward_model_weight=1.0)


@pytest.mark.parametrize("reply, answer, ended, expected", [
    ("68", "68", True, {"correct": 1.0, "partial": 1.0, "format": 1.0}),            # right
    (" 68 ", "68", True, {"correct": 1.0, "partial": 1.0, "format": 1.0}),          # surrounding space is no part
    ("red moon", "red moon", True, {"correct": 1.0, "partial": 1.0, "format": 1.0}),
    ("67", "68", True, {"correct": 0.0, "partial": 0.9855, "format": 1.0}),         # wrong, near, well formed
    ("6", "68", True, {"correct": 0.0, "partial": 0.1014, "format": 1.0}),          # far
    ("200", "68", True, {"correct": 0.0, "partial": 0.0, "format": 1.0}),           # beyond twice the answer
    ("moon red", "red moon", True, {"correct": 0.0, "partial": 0.0, "format": 1.0}),
    ("red sun", "red moon", True, {"correct": 0.0, "partial": 0.5, "format": 1.0}),
    ("68", "68", False, {"correct": 1.0, "partial": 1.0, "format": 0.0}),           # right digits, never ended its turn
    ("", "68", True, {"correct": 0.0, "partial": 0.0, "format": 0.0}),              # empty
    ("68\n69", "68", True, {"correct": 0.0, "partial": 0.0, "format": 0.0}),        # two lines
    ("680", "68", True, {"correct": 0.0, "partial": 0.0, "format": 1.0}),           # a prefix match is no match
    ("sixty-eight", "68", True, {"correct": 0.0, "partial": 0.0, "format": 1.0}),   # not a number
    ("The answer is 68 because " + "x" * 40, "68", True, {"correct": 0.0, "partial": 0.0, "format": 0.0}),  # rambling
])
def test_verify(reply, answer, ended, expected):
    assert grpo.verify(reply, answer, ended) == expected


def test_reward_functions_read_trl_batches(tiny_tokenizer):
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    funcs, weights = grpo.reward_functions(tiny_tokenizer, GrpoConfig())
    assert [f.__name__ for f in funcs] == ["correct", "partial", "format"] and weights == [1.0, 0.0, 0.2]
    completions = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "13"}],
                   [{"role": "assistant", "content": "12"}]]
    ids = [[50, end], [51, end], [50, 52]]
    assert funcs[0](completions, ids, answer=["12"] * 3) == [1.0, 0.0, 1.0]
    assert funcs[1](completions, ids, answer=["12"] * 3) == [1.0, round(1 - 1 / 13, 4), 1.0]
    assert funcs[2](completions, ids, answer=["12"] * 3) == [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_reward_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "grpo"
    metrics = execute("grpo", grpo.run, GrpoConfig(**TINY), out,
                      {"policy": tiny_model_dir, "reward_model": tiny_reward_dir}, tracker=NullTracker())
    return out, metrics


def test_metrics_curves_and_policy(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics = trained
    for key in ("gt_accuracy", "rm_score", "end_rate"):
        assert math.isfinite(metrics[key]) and math.isfinite(metrics[f"{key}_before"]), key
    assert metrics["steps"] == 3 and metrics["episodes"] == 24 and metrics["kl_ref"] > 0
    assert math.isfinite(metrics["kl_last"])
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for col in ("reward", "correct", "partial", "format", "rm_score", "kl"):
        assert all(math.isfinite(float(r[col])) for r in rows), col
    assert (out / "samples.jsonl").read_text().count("\n") == 8
    assert read_json(out / "model" / META_FILE)["metrics"]["gt_accuracy"] == metrics["gt_accuracy"]
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.eos_token == "<|endoftext|>"  # the stage's tokenizer, not the trainer's <|end|> copy
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert policy.config.eos_token_id == start.config.eos_token_id  # the trainer's alignment to <|end|> undone
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))


def test_user_prompts_need_answers(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}) + "\n")
    rows = grpo.training_prompts(GrpoConfig(train_prompts=0, prompts_per_step=1, data_files=[str(good)]))
    assert rows == [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}]
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    with pytest.raises(InputError, match=r'q\.jsonl:1: grpo needs an "answer"'):
        grpo.training_prompts(GrpoConfig(data_files=[str(bad)]))
    with pytest.raises(ConfigError, match="nothing to learn from"):
        parse_section("grpo", {"correct_weight": 0, "partial_weight": 0, "format_weight": 0})
    assert len(grpo.training_prompts(GrpoConfig(train_prompts=10))) == 10
    assert posttrain_data.score("4", "4") == 1.0
