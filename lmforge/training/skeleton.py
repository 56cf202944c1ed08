"""The shape every training stage shares, so that a stage module holds only what is its own:

    inputs validated -> model and data -> trainer with resume -> evaluation -> save -> metrics

Here: the Trainer arguments every stage sets alike (`trainer_args`), the starting model's held-out figures
(`log_before`) and the closing step (`save_model`). The resume life cycle is `lmforge.training.resume.Resumable`;
the alignment stages' own steps (ppo, dpo, grpo) are `lmforge.training.alignment`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lmforge import distributed
from lmforge.models import set_generation_defaults
from lmforge.stage import write_meta
from lmforge.training import resume


# ------------------------------------------------------------------------------------------ trainer
def runtime_args(cfg, work: Path, device: str, *, bf16: bool = True) -> dict:
    """Trainer arguments of every stage: no report_to (the stage tracks), its seed, CPU or CUDA (bf16 there
    unless `bf16` is off), no activation checkpointing (TRL turns it on; pointless for small models, and slower),
    and this process's place under torchrun."""
    return dict(output_dir=str(work), report_to="none", seed=cfg.seed, use_cpu=device == "cpu",
                bf16=bf16 and device == "cuda", activation_checkpointing=False, **distributed.trainer_args())


def trainer_args(cfg, work: Path, device: str, *, checkpoints: bool, bf16: bool = True, log_first: bool = True) -> dict:
    """runtime_args plus what a Trainer stage sets alike: the data order's seed, data loaded in this process,
    a log every log_every steps (and after the first with `log_first`) and, with `checkpoints`, the resumable
    checkpoints in `work` (lmforge.training.resume)."""
    return dict(runtime_args(cfg, work, device, bf16=bf16), data_seed=cfg.seed, dataloader_num_workers=0,
                logging_steps=cfg.log_every, logging_first_step=log_first,
                **resume.save_args(work if checkpoints else None, cfg.checkpoint_every))


# ------------------------------------------------------------------------------------- evaluation
def log_before(tracker, before: dict) -> None:
    """The held-out figures of the starting model, at step 0 (per-task breakdowns stay in metrics.json)."""
    tracker.log_metrics({k: v for k, v in before.items() if not isinstance(v, dict)}, step=0)


# --------------------------------------------------------------------------------------------- save
def save_model(folder: Path, model, tokenizer, stage: str, cfg, metrics: dict, inputs: Mapping[str, Path], *,
               generation_defaults: bool = True) -> None:
    """The model with its tokenizer and meta file, loadable with transformers; a chat model with
    `generation_defaults` stops at end-of-turn when generate() gets no arguments."""
    if generation_defaults:
        set_generation_defaults(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_meta(folder, stage, cfg, metrics, inputs)
