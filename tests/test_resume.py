"""The Trainer stages resume after a crash (lmforge/training/resume.py): sft and dpo, stopped after their checkpoint and run
again with the same config, end with the very weights (and dpo with the metrics) an uninterrupted run ends with
(CPU, deterministic), and say from which step they went on; so do reward (weights) and ppo (weights, metrics,
curves: its own checkpoints, lmforge/training/ppo_backend.py); lora and grpo at least write a checkpoint, pick it up and
finish the run from there.
(pretrain's resume is tests/test_pretrain.py::test_resume_continues_the_same_run_only.)"""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import Trainer, TrainerCallback

from tasks import dpo
from lmforge.training import finetune
from tasks import grpo
from tasks import lora
from tasks import ppo
from lmforge.training import ppo_backend
from lmforge.training import resume
from tasks import reward
from tasks import sft
from lmforge.config import DpoConfig, GrpoConfig, LoraConfig, PpoConfig, RewardConfig, SftConfig
from lmforge.stage import execute
from lmforge.tracking import NullTracker

TINY = dict(replay_share=0.0, train_examples=64, test_examples=8, max_steps=6, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1,
            eval_batch_size=8, max_new_tokens=2, num_threads=1, checkpoint_every=3)


class Killed(Exception):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


def test_sft_resumed_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path,
                                                                                 monkeypatch, capfd):
    cfg, base = SftConfig(**TINY), {"base": tiny_model_dir}
    whole = execute("sft", sft.run, cfg, tmp_path / "whole", base, extra={"checkpoints": tmp_path / "ck-whole"},
                    tracker=NullTracker())
    assert whole["resumed_from_step"] == 0 and not (tmp_path / "ck-whole").exists()  # cleared once done

    checkpoints = tmp_path / "ck"
    make_trainer = finetune.make_trainer

    def crashing(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(CrashAt(4))  # after the checkpoint at step 3
        return trainer

    monkeypatch.setattr(finetune, "make_trainer", crashing)
    with pytest.raises(Killed):
        execute("sft", sft.run, cfg, tmp_path / "resumed", base, extra={"checkpoints": checkpoints}, tracker=NullTracker())
    assert (checkpoints / "checkpoint-3").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(finetune, "make_trainer", make_trainer)
    capfd.readouterr()

    resumed = execute("sft", sft.run, cfg, tmp_path / "resumed", base, extra={"checkpoints": checkpoints},
                      tracker=NullTracker())
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == TINY["max_steps"]
    assert f"sft: resuming from {checkpoints / 'checkpoint-3'}" in capfd.readouterr().err
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert not any(torch.equal(a[k], v) for k, v in _weights_of_base(tiny_model_dir).items() if k in a and v.dim() > 1)


def test_checkpoints_of_another_config_are_not_resumed(tiny_model_dir, tmp_path):
    checkpoints = tmp_path / "ck"
    (checkpoints / "checkpoint-3").mkdir(parents=True)
    (checkpoints / "fingerprint").write_text("written-by-another-run")
    assert resume.resume_point(checkpoints, "this-run") is None and not checkpoints.exists()


def _weights_of_base(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ------------------------------------------------------------------------------- the other stages
def _crash_then_resume(stage, fn, cfg, inputs, tmp_path, capfd, crash_at: int, checkpoint_at: int) -> dict:
    """Run a stage that dies at step `crash_at` (any Trainer subclass: the callback goes in at Trainer.__init__),
    check it left its checkpoint, run it again: returns the resumed run's metrics."""
    checkpoints, out = tmp_path / "ck", tmp_path / "resumed"
    init = Trainer.__init__

    def crashing(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(CrashAt(crash_at))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "__init__", crashing)
        with pytest.raises(Killed):
            execute(stage, fn, cfg, out, inputs, extra={"checkpoints": checkpoints}, tracker=NullTracker())
    assert (checkpoints / f"checkpoint-{checkpoint_at}").is_dir() and not out.exists()
    capfd.readouterr()
    metrics = execute(stage, fn, cfg, out, inputs, extra={"checkpoints": checkpoints}, tracker=NullTracker())
    said = f"{stage}: resuming from {checkpoints / f'checkpoint-{checkpoint_at}'} (step {checkpoint_at})"
    assert said in capfd.readouterr().err
    assert metrics["resumed_from_step"] == checkpoint_at and not checkpoints.exists()  # cleared once done
    return metrics


DPO = dict(train_pairs=32, test_pairs=8, test_prompts=8, max_steps=6, batch_size=8, lr=3e-3, warmup_steps=0,
           log_every=1, eval_batch_size=8, max_new_tokens=4, num_threads=1, checkpoint_every=3)
TIMINGS = {"train_s", "wall_time_s", "resumed_from_step"}


def test_dpo_resumed_after_a_crash_ends_with_the_weights_and_metrics_of_an_uninterrupted_run(
        tiny_model_dir, tiny_reward_dir, tmp_path, capfd):
    cfg, inputs = DpoConfig(**DPO), {"policy": tiny_model_dir, "reward_model": tiny_reward_dir}
    whole = execute("dpo", dpo.run, cfg, tmp_path / "whole", inputs, extra={"checkpoints": tmp_path / "ck-whole"},
                    tracker=NullTracker())
    resumed = _crash_then_resume("dpo", dpo.run, cfg, inputs, tmp_path, capfd, crash_at=4, checkpoint_at=3)
    assert whole["resumed_from_step"] == 0 and resumed["steps"] == whole["steps"] == DPO["max_steps"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    # the killed attempt's logs are replayed, so even train_loss_first is the uninterrupted run's
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {k: v for k, v in whole.items() if k not in TIMINGS}


def test_reward_resumed_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path, capfd):
    cfg, inputs = RewardConfig(train_pairs=32, test_pairs=8, gt_prompts=8, batch_size=8, epochs=1.0, lr=1e-3,
                               eval_every=4, log_every=1, num_threads=1, checkpoint_every=2), {"sft": tiny_model_dir}
    whole = execute("reward", reward.run, cfg, tmp_path / "whole", inputs, tracker=NullTracker())
    metrics = _crash_then_resume("reward", reward.run, cfg, inputs, tmp_path, capfd, crash_at=3, checkpoint_at=2)
    assert metrics["steps"] == 4 and metrics["train_loss_first"] == whole["train_loss_first"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_grpo_resumes_from_its_checkpoint_and_keeps_the_whole_curve(tiny_model_dir, tiny_reward_dir, tmp_path, capfd):
    cfg = GrpoConfig(train_prompts=16, test_prompts=4, max_steps=3, prompts_per_step=2, group_size=4, response_length=4,
                     lr=1e-3, warmup_steps=0, log_every=1, eval_batch_size=4, num_threads=1, checkpoint_every=2)
    metrics = _crash_then_resume("grpo", grpo.run, cfg, {"policy": tiny_model_dir, "reward_model": tiny_reward_dir},
                                 tmp_path, capfd, crash_at=3, checkpoint_at=2)
    assert metrics["steps"] == 3
    with (tmp_path / "resumed" / "curves.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3]  # steps 1-2 from the killed attempt


def test_lora_resumes_from_its_checkpoint(tiny_model_dir, tmp_path, capfd):
    cfg = LoraConfig(replay_share=0.0, train_examples=32, test_examples=8, max_steps=4, batch_size=8, lr=2e-2, warmup_steps=0, log_every=1,
                     eval_batch_size=8, max_new_tokens=2, num_threads=1, r=4, alpha=8, checkpoint_every=2)
    metrics = _crash_then_resume("lora", lora.run, cfg, {"base": tiny_model_dir}, tmp_path, capfd,
                                 crash_at=3, checkpoint_at=2)
    assert metrics["steps"] == 4 and (tmp_path / "resumed" / "adapter").is_dir()


def test_ppo_resumed_after_a_crash_ends_with_the_weights_metrics_and_curves_of_an_uninterrupted_run(
        tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch, capfd):
    """TRL's PPOTrainer has no resume of its own: the checkpoint holds policy, value model, optimizer, scheduler,
    RNG (torch, numpy, python) and logs, and the batch order is a function of the update alone."""
    cfg = PpoConfig(train_prompts=16, test_prompts=8, steps=5, batch_size=4, mini_batches=2, ppo_epochs=1,
                    response_length=4, lr=1e-3, eval_batch_size=8, num_threads=1, checkpoint_every=2)
    inputs = {"policy": tiny_model_dir, "reward_model": tiny_reward_dir}
    whole = execute("ppo", ppo.run, cfg, tmp_path / "whole", inputs, extra={"checkpoints": tmp_path / "ck-whole"},
                    tracker=NullTracker())
    assert whole["resumed_from_step"] == 0 and not (tmp_path / "ck-whole").exists()

    checkpoints, out = tmp_path / "ck", tmp_path / "resumed"
    train = ppo_backend.train
    monkeypatch.setattr(ppo_backend, "train", lambda **kw: train(**{**kw, "callbacks": [*kw["callbacks"], CrashAt(3)]}))
    with pytest.raises(Killed):
        execute("ppo", ppo.run, cfg, out, inputs, extra={"checkpoints": checkpoints}, tracker=NullTracker())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "fingerprint"] and not out.exists()
    monkeypatch.setattr(ppo_backend, "train", train)
    capfd.readouterr()

    resumed = execute("ppo", ppo.run, cfg, out, inputs, extra={"checkpoints": checkpoints}, tracker=NullTracker())
    assert f"ppo: resuming from {checkpoints / 'checkpoint-2'} (step 2)" in capfd.readouterr().err
    assert resumed["resumed_from_step"] == 2 and not checkpoints.exists()
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {k: v for k, v in whole.items() if k not in TIMINGS}
    curves = [list(csv.DictReader((folder / "curves.csv").open())) for folder in (tmp_path / "whole", out)]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "eps"} for r in rows]  # noqa: E731 (episodes/s: timing)
    assert [int(r["step"]) for r in curves[1]] == [1, 2, 3, 4, 5] and drop(curves[0]) == drop(curves[1])
