"""ppo: RLHF with PPO: the policy learns to raise the reward model's score, held near its start by a KL penalty.

Policy = the SFT (or merged LoRA) model; reference = a frozen copy of it; reward = the reward model's
score of the finished turn (read at the end-of-turn token); value model = a trainable copy of the reward
model. Rollouts answer built-in training prompts through the chat template. Before and after training
the policy answers held-out prompts (greedy by default) and is measured by mean reward-model score and
by the ground-truth scorer. Optional quality gate: refuse a reward model whose held-out pairwise
accuracy is below `min_reward_accuracy`. The PPO algorithm itself lives behind `lmforge.training.ppo_backend`.
Output: out/model (policy, loads with `AutoModelForCausalLM`, tokenizer beside it), out/curves.csv,
out/samples.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmforge.data import posttrain_data
from lmforge.training import ppo_backend
from lmforge.training import resume
from lmforge.config import PpoConfig
from lmforge.training.callbacks import OnLog
from lmforge.models import load_tokenizer
from lmforge.training.alignment import before_after, load_policies, publish_policy
from lmforge.training.policy_eval import check_same_tokenizer, measure, measure_start, query_ids
from lmforge.training.scoring import ACCURACY_KEY, load_reward_model
from lmforge.training.skeleton import log_before
from lmforge.errors import InputError
from lmforge.stage import META_FILE, cli, read_json
from lmforge.tracking import Tracker


# ------------------------------------------------------------------------------------------- inputs
def check_gate(cfg: PpoConfig, reward_model: Path) -> float | None:
    """The quality gate: the reward stage's held-out pairwise accuracy must reach min_reward_accuracy."""
    if cfg.min_reward_accuracy is None:
        return None
    meta = Path(reward_model) / META_FILE
    if not meta.exists():
        raise InputError(f"{meta}: missing, so ppo.min_reward_accuracy={cfg.min_reward_accuracy} cannot be "
                         "checked (the reward stage writes it beside the model)")
    accuracy = read_json(meta).get("metrics", {}).get(ACCURACY_KEY)
    if not isinstance(accuracy, (int, float)):
        raise InputError(f"{meta}: no metrics.{ACCURACY_KEY}, so ppo.min_reward_accuracy cannot be checked")
    if accuracy < cfg.min_reward_accuracy:
        raise InputError(
            f"reward model {reward_model} has held-out pairwise accuracy {accuracy:.3f}, below "
            f"ppo.min_reward_accuracy={cfg.min_reward_accuracy}: improve the reward stage or lower the gate"
        )
    return float(accuracy)


def training_prompts(cfg: PpoConfig) -> list[list[dict]]:
    prompts = [r["prompt"] for r in posttrain_data.prompts("train", cfg.train_prompts, cfg.seed)]
    for path in cfg.data_files:
        for row in posttrain_data.load_jsonl(path, "prompt"):
            p = row["prompt"]
            prompts.append([{"role": "user", "content": p}] if isinstance(p, str) else p)
    if len(prompts) < cfg.batch_size:
        raise InputError(f"ppo: {len(prompts)} training prompts, fewer than one batch ({cfg.batch_size})")
    return prompts


def eval_settings(cfg: PpoConfig) -> dict:
    """How the held-out prompts are answered, as dpo and grpo answer them (lmforge.training.policy_eval), replies
    sampled at eval_temperature."""
    return dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.response_length, seed=cfg.seed,
                temperature=cfg.eval_temperature)


# -------------------------------------------------------------------------------------------- stage
def run(cfg: PpoConfig, *, policy: Path, reward_model: Path, out: Path, tracker: Tracker,
        checkpoints: Path | None = None) -> dict:
    """PPO against the reward model with a KL penalty to the starting policy. With `checkpoints` (scratch, see
    lmforge.training.resume) a rerun of the same run goes on from the last checkpoint there."""
    gate = check_gate(cfg, reward_model)  # before anything heavy
    tok = load_tokenizer(policy)
    check_same_tokenizer(tok, policy, reward_model)
    prompts = training_prompts(cfg)
    test = posttrain_data.prompts("test", cfg.test_prompts, cfg.seed)

    device, model, ref, rm = load_policies("ppo", cfg, policy, reward_model, tok, tracker, prompts_total=len(prompts))
    value = load_reward_model(reward_model, tok.pad_token_id).to(device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    before, samples_before = measure_start(policy, reward_model, model, tok, test, suffix="_before", reward_model=rm,
                                           **eval_settings(cfg))
    log_before(tracker, before)

    curves: list[dict] = []
    names = ppo_backend.CURVES

    def collect(step: int, logs: dict) -> None:
        row = {"step": step, **{names[k]: logs[k] for k in names if k in logs}}
        if "ended" in row:  # a count of rollouts that closed their turn -> a rate
            row["end_rate"] = row.pop("ended") / cfg.batch_size
        curves.append(row)
        # "rollout/": statistics of each update's rollouts, unlike the held-out rm_score at the end
        tracker.log_metrics({f"rollout/{k}": v for k, v in row.items() if k != "step"}, step=step)

    on_log = OnLog(collect)
    with resume.Resumable("ppo", checkpoints, resume.fingerprint(cfg, [policy, reward_model], prompts), out) as run:
        run.train(  # with the killed attempt's updates: curves and tracked metrics whole
            ppo_backend.train, on_log, policy=model, ref_policy=ref, reward_model=rm, value_model=value, tokenizer=tok,
            queries=[query_ids(tok, p) for p in prompts], cfg=cfg, device=device.type,
            callbacks=[on_log], checkpoints=checkpoints,
        )
    changed = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())

    after, samples_after = measure(model, tok, test, reward_model=rm, ref=ref, **eval_settings(cfg))  # logged by the runner

    tail = curves[-5:]  # the last few updates, less noisy than the very last one
    metrics = {
        **before_after(before, after, samples_before, samples_after,
                       rm_score_gain=round(after["rm_score"] - before["rm_score_before"], 4)),
        "train_rm_score_first": round(curves[0]["rm_score"], 4) if curves else None,
        "train_rm_score_last": round(sum(r["rm_score"] for r in tail) / len(tail), 4) if tail else None,
        "kl_last": round(sum(r["kl"] for r in tail) / len(tail), 4) if tail else None,
        "kl_max": round(max(r["kl"] for r in curves), 4) if curves else None,
        "entropy_last": round(sum(r["entropy"] for r in tail) / len(tail), 4) if tail else None,
        "weights_changed": changed,
        "steps": cfg.steps, "episodes": cfg.steps * cfg.batch_size, "train_prompts": len(prompts),
        "test_prompts": len(test), "train_s": round(run.seconds, 2), "reward_accuracy_gate": gate,
        "resumed_from_step": run.step,
    }
    # the policy keeps the generation settings it came with (ppo_backend undoes TRL's)
    publish_policy(out, "ppo", cfg, metrics, {"policy": policy, "reward_model": reward_model}, model, tok, tracker,
                   test=test, samples_before=samples_before, samples_after=samples_after, curves=curves,
                   generation_defaults=False)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("ppo", run, inputs=("policy", "reward_model"), argv=argv, options=resume.OPTION)


if __name__ == "__main__":
    sys.exit(main())
