"""A TRL stage resumes after a crash: sft, stopped after its checkpoint, run again with the same config, ends
with the very weights an uninterrupted run ends with (CPU, deterministic), and says from which step it went on.
(pretrain's resume is tests/test_pretrain.py::test_resume_continues_the_same_run_only.)"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from tasks import finetune, sft
from tasks.config import SftConfig
from tasks.stage import execute
from tasks.tracking import NullTracker

TINY = dict(train_examples=64, test_examples=8, max_steps=6, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1,
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
    assert finetune.resume_point(checkpoints, "this-run") is None and not checkpoints.exists()


def _weights_of_base(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")
