"""reward stage on the tiny random Llama: trains, measures before/after, saves a loadable classifier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.data import posttrain_data
from tasks import reward
from lmforge.training import resume, scoring
from lmforge.config import RewardConfig
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute, read_json
from lmforge.tracking import NullTracker

TINY = dict(train_pairs=48, test_pairs=16, gt_prompts=16, batch_size=8, epochs=2.0, lr=1e-3, eval_every=6, log_every=2)


class Recorder(NullTracker):
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "reward"
    tracker = Recorder()
    metrics = execute("reward", reward.run, RewardConfig(**TINY), out, {"sft": tiny_model_dir}, tracker=tracker)
    return out, metrics, tracker


def test_metrics_before_and_after(trained):
    out, metrics, _ = trained
    for key in ("test_accuracy", "test_margin", "gt_agreement"):
        assert 0 <= metrics[key] <= 1 or key == "test_margin"
        assert f"{key}_before" in metrics
    assert set(metrics["gt_agreement_by_task"]) == set(posttrain_data.TASKS)
    assert metrics["train_pairs"] == 48 and metrics["steps"] == 12
    assert math.isfinite(metrics["train_loss"])
    assert read_json(out / "metrics.json")["test_accuracy"] == metrics["test_accuracy"]
    meta = read_json(out / "model" / META_FILE)
    assert meta["stage"] == "reward" and meta["metrics"][scoring.ACCURACY_KEY] == metrics["test_accuracy"]
    assert not (out / resume.TRAINER_TMP).exists()  # the Trainer's scratch folder goes once training is done


def test_training_fits_the_pairs(trained):
    """A high learning rate on 48 pairs must at least fit them: the logged loss falls below chance (log 2)."""
    _, metrics, tracker = trained
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["train_loss_last"] < math.log(2)
    curves = [m for _, m in tracker.logged if "trainer/loss" in m]
    assert len(curves) >= 3
    assert any("trainer/eval_accuracy" in m for _, m in tracker.logged)


def test_saved_model_loads_and_changed(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, _, _ = trained
    rm = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(rm.model.embed_tokens.weight, base.model.embed_tokens.weight)
    pair = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    scores = scoring.score_conversations(rm, tok, [pair, pair])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] == scores[1]


def test_user_pairs_added_and_bad_rows_named(tiny_model_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}) + "\n")
    rows = reward.user_pairs([str(good)])
    assert rows == [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
                     "chosen": [{"role": "assistant", "content": "2"}],
                     "rejected": [{"role": "assistant", "content": "3"}]}]
    bad = tmp_path / "bad.jsonl"
    ok = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    bad.write_text(ok + "\n" + '{"prompt": "q", "chosen": "a"}\n')
    cfg = RewardConfig(**{**TINY, "data_files": [str(bad)]})
    with pytest.raises(InputError, match=r"bad\.jsonl:2: .*rejected"):
        reward.run(cfg, sft=tiny_model_dir, out=tmp_path / "out", tracker=NullTracker())


def test_ground_truth_cases_are_wrong_answers():
    rows = posttrain_data.prompts("test", 40, 0)
    cases = reward.ground_truth_cases(rows, 0)
    assert len(cases) == 40
    assert all(posttrain_data.score(c["wrong"], c["answer"]) == 0.0 for c in cases)


def test_cli_reports_missing_model(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("reward:\n  train_pairs: 8\n")
    code = reward.main(["--params", str(params), "--sft", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
