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
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Sequence

from tasks import distributed
from tasks.chat import END
from tasks.config import PpoConfig

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
          cfg: PpoConfig, device: str, callbacks: Sequence = ()) -> None:
    """PPO with a KL penalty to `ref_policy` (frozen), rewards from `reward_model` read at the stop token."""
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know; this module is the seam for that reason
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    tok.eos_token = END  # see module doc: TRL checks "ended" against eos, we stop at end-of-turn
    saved_eos = policy.generation_config.eos_token_id

    with tempfile.TemporaryDirectory(prefix="lmforge-ppo-") as workdir:
        args = PPOConfig(
            output_dir=workdir, seed=cfg.seed, report_to="none", save_strategy="no",
            use_cpu=device == "cpu", bf16=False, activation_checkpointing=False,
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
            **distributed.trainer_args(),
        )
        with warnings.catch_warnings():  # TRL reads the deprecated `is_gradient_checkpointing` (transformers 5)
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            trainer = PPOTrainer(
                args=args, processing_class=tok, model=policy, ref_model=ref_policy, reward_model=reward_model,
                value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": [list(q) for q in queries]}),
                callbacks=list(callbacks),
            )
        try:
            trainer.train()
        finally:
            policy.generation_config.eos_token_id = saved_eos
