"""The one module that imports TRL's PPO (`trl.experimental.ppo`, TRL 1.12), so it can be swapped out.

`train()` runs PPO in place on `policy` and `value_model`; TRL's own logs reach the caller through
`callbacks` (transformers `TrainerCallback.on_log`, one log per PPO update). TRL 1.12 behaviour this
module works around:
- `PPOConfig` inherits TRL defaults bf16=True and gradient checkpointing on: both are switched off.
- the stop token: `stop_token_id` truncates rollouts, but the missing-stop penalty and the
  `val/num_eos_tokens` count look for `tokenizer.eos_token`, so the trainer gets a copy of the tokenizer
  whose eos is the end-of-turn token, and `stop_token="eos"`.
- it overwrites `policy.generation_config.eos_token_id` with the stop token; restored afterwards.
- queries must be left-padded (generation continues from the last column), hence padding_side="left".
- it has no resume: `Checkpoints` (below) writes everything a rerun needs to go on exactly where a killed one
  stopped, and `train(resume_from_checkpoint=...)` puts it back: the loop runs only the updates left.
- it seeds torch, not numpy, whose global RNG splits each batch into minibatches: seeded here.
- its shuffled DataLoader draws each epoch's seed from the global RNG, so the batch order would depend on
  when an epoch starts relative to the sampling; `Batches` orders prompts by (seed, epoch) alone.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from lmforge import distributed
from lmforge.chat import end_token
from lmforge.config import PpoConfig
from lmforge.training.skeleton import runtime_args

# TRL log keys -> the names the stage uses in curves.csv
CURVES = {
    "objective/scores": "rm_score",  # minus missing_end_penalty for rollouts that never ended their turn
    "objective/kl": "kl",
    "policy/entropy_avg": "entropy",
    "objective/entropy": "seq_neg_logprob",
    "policy/clipfrac_avg": "clipfrac",
    "loss/value_avg": "value_loss",
    "loss/policy_avg": "policy_loss",
    "objective/rlhf_reward": "rlhf_reward",
    "policy/approxkl_avg": "approxkl",
    "val/num_eos_tokens": "ended",
    "lr": "lr",
    "episode": "episode",
}


def train(*, policy, ref_policy, reward_model, value_model, tokenizer, queries: Sequence[list[int]],
          cfg: PpoConfig, device: str, callbacks: Sequence = (), checkpoints: Path | None = None,
          resume_from_checkpoint: str | None = None) -> None:
    """PPO with a KL penalty to `ref_policy` (frozen), rewards from `reward_model` read at the stop token.
    With `checkpoints`, a resumable checkpoint every `cfg.checkpoint_every` updates; with `resume_from_checkpoint`
    (one of them; named as Trainer.train names it), training goes on from there as the run that wrote it would have."""
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know; this module is the seam for that reason
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    tok.eos_token = end_token(tok)  # see module doc: TRL checks "ended" against eos, we stop at end-of-turn
    saved_eos = policy.generation_config.eos_token_id

    with tempfile.TemporaryDirectory(prefix="lmforge-ppo-") as workdir:
        args = PPOConfig(
            **runtime_args(cfg, Path(workdir), device, bf16=False), save_strategy="no",  # Checkpoints (below) saves
            # each process rolls out its share; TRL multiplies by the number of processes (global batch kept)
            per_device_train_batch_size=distributed.per_process(cfg.batch_size, "ppo.batch_size"),
            gradient_accumulation_steps=1,
            num_mini_batches=cfg.mini_batches, total_episodes=cfg.steps * cfg.batch_size,
            local_rollout_forward_batch_size=distributed.per_process(cfg.batch_size, "ppo.batch_size"), num_ppo_epochs=cfg.ppo_epochs,
            learning_rate=cfg.lr, lr_scheduler_type="linear", response_length=cfg.response_length,
            temperature=cfg.temperature, stop_token="eos", missing_eos_penalty=cfg.missing_end_penalty,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange,
            cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, gamma=cfg.gamma, lam=cfg.lam,
            whiten_rewards=cfg.whiten_rewards,  # TRL logs every update whatever logging_steps says
            num_sample_generations=0,  # its sample tables need an eval set; the stage evaluates itself
        )
        with warnings.catch_warnings():  # TRL reads the deprecated `is_gradient_checkpointing` (transformers 5)
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            trainer = PPOTrainer(
                args=args, processing_class=tok, model=policy, ref_model=ref_policy, reward_model=reward_model,
                value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": [list(q) for q in queries]}),
                callbacks=list(callbacks),
            )
        args = trainer.args
        # TRL seeds torch only, yet draws each update's minibatch split from numpy's global RNG: unseeded, two
        # runs of one config trained on different splits (measured: different curves from the first update)
        np.random.seed((cfg.seed + distributed.rank() * 100_003) % 2**32)
        random.seed(cfg.seed + distributed.rank() * 100_003)
        done = _restore(trainer, policy, value_model, resume_from_checkpoint) if resume_from_checkpoint else 0
        trainer.dataloader = Batches(trainer.train_dataset, trainer.data_collator, args.local_batch_size, cfg.seed,
                                     start=done)
        # first in line, so the progress bar starts from the numbers it sets
        trainer.callback_handler.callbacks.insert(0, Checkpoints(checkpoints, cfg.checkpoint_every, policy,
                                                                 value_model, done, args.num_total_batches))
        args.num_total_batches -= done  # the loop runs the updates left; Checkpoints numbers them on from `done`
        try:
            trainer.train()
        finally:
            policy.generation_config.eos_token_id = saved_eos


# ---------------------------------------------------------------------------------------- resume
class Batches:
    """Rollout prompts, batch after batch for ever, from update `start` on: epoch e visits them in the order of
    a generator seeded with (seed, e), so any update's batch is known without replaying the run. Under
    torchrun, process r of w takes every w-th batch."""

    def __init__(self, dataset, collate, batch_size: int, seed: int, start: int = 0):
        self.dataset, self.collate, self.batch_size, self.seed, self.start = dataset, collate, batch_size, seed, start

    def __iter__(self):
        n, w, r = len(self.dataset), distributed.world_size(), distributed.rank()
        per_epoch = n // self.batch_size  # whole batches only, as TRL's drop_last
        j = self.start * w + r
        while True:
            epoch, i = divmod(j, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            rows = order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            yield self.collate([self.dataset[k] for k in rows])
            j += w


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints(TrainerCallback):
    """Every `every` updates (not after the last): policy and value weights (safetensors), optimizer and
    scheduler state, every process's RNG state and the logs so far, in `folder`/checkpoint-<update>. Written in
    a hidden folder and renamed, so a kill mid-write leaves the previous checkpoint whole; one is kept.
    Also numbers a resumed run's updates and episodes on from the checkpoint (TRL's loop starts them at 0)."""

    def __init__(self, folder: Path | None, every: int, policy, value_model, done: int, total: int):
        self.folder, self.every, self.policy, self.value, self.done, self.total = folder, every, policy, value_model, done, total

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step, state.episode, state.max_steps = self.done, self.done * args.batch_size, self.total

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        if self.folder is None or self.every <= 0 or step % self.every or step >= self.total:
            return
        from safetensors.torch import save_model

        partial = self.folder / f".checkpoint-{step}.partial"
        if distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        distributed.barrier()
        torch.save(_rng_state(), partial / f"rng-{distributed.rank()}.pt")
        if distributed.is_main():
            save_model(self.policy, str(partial / "policy.safetensors"))
            save_model(self.value, str(partial / "value.safetensors"))
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), partial / "scheduler.pt")
            # lmforge.training.resume.earlier_logs reads the curve up to here from this file, as from a Trainer checkpoint's
            (partial / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": state.log_history}))
        distributed.barrier()
        if distributed.is_main():
            os.replace(partial, self.folder / f"checkpoint-{step}")
            for old in self.folder.glob("checkpoint-*"):
                if old.name != f"checkpoint-{step}":
                    shutil.rmtree(old, ignore_errors=True)


def _restore(trainer, policy, value_model, checkpoint: str) -> int:
    """Puts a checkpoint's weights, optimizer, scheduler, RNG and logs back into a built trainer; the number
    of updates it had done."""
    from safetensors.torch import load_model

    folder = Path(checkpoint)
    load_model(policy, str(folder / "policy.safetensors"))
    load_model(value_model, str(folder / "value.safetensors"))
    trainer.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    trainer.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    state = json.loads((folder / "trainer_state.json").read_text())
    trainer.state.log_history = list(state["log_history"])
    _set_rng_state(torch.load(folder / f"rng-{distributed.rank()}.pt", weights_only=True))
    return int(state["global_step"])
