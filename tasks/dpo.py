"""dpo: direct preference optimisation with TRL's DPOTrainer: the policy learns from preference pairs directly,
with no reward model and no sampling, held near the frozen starting policy (the reference) by beta.

Policy and reference = the SFT (or merged LoRA) model. Data: the built-in preference pairs (the correct answer
chosen over a near miss, `posttrain_data.preference_pairs`) plus optional user files in TRL's preference format,
validated before the model loads. Measured before and after on held-out data: the policy's own preference
accuracy on held-out pairs (does it give the chosen reply the higher log-probability), DPO's implicit-reward
accuracy and margin on them, and on held-out prompts the ground-truth exact match, the learned reward model's
score and the KL from the reference (`lmforge.training.policy_eval`, as ppo and grpo measure).
Output: out/model (policy, loads with `AutoModelForCausalLM`, tokenizer beside it), out/samples.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge import distributed
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.training.callbacks import ForwardLogs
from lmforge.config import DpoConfig
from lmforge.models import load_tokenizer
from lmforge.training.policy_eval import check_same_tokenizer, measure, measure_start, preference_accuracy
from lmforge.training.alignment import before_after, load_policies, publish_policy
from lmforge.training.skeleton import log_before, trainer_args
from lmforge.errors import InputError
from lmforge.stage import cli
from lmforge.tracking import Tracker

PAIR_KEYS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------- data
def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def training_pairs(cfg: DpoConfig) -> list[dict]:
    """The user's preference files (validated first, so a bad row fails fast) plus the built-in train pairs."""
    rows = []
    for path in cfg.data_files:
        for row in posttrain_data.load_jsonl(path, "preference"):
            rows.append({"prompt": _as_messages(row["prompt"], "user"), "chosen": _as_messages(row["chosen"], "assistant"),
                         "rejected": _as_messages(row["rejected"], "assistant")})
    rows.extend({k: r[k] for k in PAIR_KEYS} for r in posttrain_data.preference_pairs("train", cfg.train_pairs, cfg.seed))
    if not rows:
        raise InputError("dpo: no training pairs: train_pairs is 0 and data_files is empty")
    return rows


def make_trainer(cfg: DpoConfig, model, ref, tokenizer, train: list[dict], test: list[dict], work: Path, device: str,
                 tracker: Tracker, history: list[dict], checkpoints: bool = False):
    from datasets import Dataset
    from trl import DPOConfig as TrlDpoConfig
    from trl import DPOTrainer

    args = TrlDpoConfig(
        max_steps=cfg.max_steps,
        per_device_train_batch_size=distributed.per_process(cfg.batch_size, "batch_size"),
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        beta=cfg.beta,
        # the NLL term keeps the chosen replies likely: without it DPO widens the margin by lowering both
        loss_type=[cfg.loss_type, "sft"] if cfg.sft_weight > 0 else [cfg.loss_type],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        max_length=min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length)),
        eval_strategy="no",
        **trainer_args(cfg, work, device, checkpoints=checkpoints),  # resumable: see lmforge.training.resume
    )
    return DPOTrainer(
        model=model, ref_model=ref, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(test),
        callbacks=[ForwardLogs(tracker, history)],
    )


# -------------------------------------------------------------------------------------------- stage
def run(cfg: DpoConfig, *, policy: Path, reward_model: Path, out: Path, tracker: Tracker,
        checkpoints: Path | None = None) -> dict:
    """DPO on preference pairs from the starting policy, measured before and after on held-out data."""
    from transformers import set_seed

    train = training_pairs(cfg)  # before anything heavy
    tok = load_tokenizer(policy)
    check_same_tokenizer(tok, policy, reward_model)
    test_pairs = [{k: r[k] for k in PAIR_KEYS} for r in posttrain_data.preference_pairs("test", cfg.test_pairs, cfg.seed)]
    test = posttrain_data.prompts("test", cfg.test_prompts, cfg.seed)

    set_seed(cfg.seed)
    device, model, ref, rm = load_policies("dpo", cfg, policy, reward_model, tok, tracker, pairs_total=len(train))
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, reward_model=rm, seed=cfg.seed)
    before, samples_before = measure_start(policy, reward_model, model, tok, test, suffix="_before", **kw)
    before["pref_accuracy_before"] = preference_accuracy(model, tok, test_pairs, cfg.eval_batch_size)
    log_before(tracker, before)

    history: list[dict] = []
    with resume.Resumable("dpo", checkpoints, resume.fingerprint(cfg, [policy], train), out) as run:
        trainer = make_trainer(cfg, model, ref, tok, train, test_pairs, run.work, device.type, tracker, history,
                               checkpoints=run.saves)
        result = run.train(trainer.train, ForwardLogs(tracker, history))  # with the killed attempt's first losses
    final = trainer.evaluate()
    model = trainer.model

    after, samples_after = measure(model, tok, test, ref=ref, **kw)
    after["pref_accuracy"] = preference_accuracy(model, tok, test_pairs, cfg.eval_batch_size)
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    metrics = {
        **before_after(before, after, samples_before, samples_after),
        "implicit_reward_accuracy": round(final["eval_rewards/accuracies"], 4),
        "implicit_reward_margin": round(final["eval_rewards/margins"], 4),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "resumed_from_step": run.step,
        "steps": result.global_step, "train_pairs": len(train), "test_pairs": len(test_pairs),
        "test_prompts": len(test), "train_s": round(run.seconds, 2),
    }
    publish_policy(out, "dpo", cfg, metrics, {"policy": policy, "reward_model": reward_model}, model, tok, tracker,
                   test=test, samples_before=samples_before, samples_after=samples_after)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("dpo", run, inputs=("policy", "reward_model"), argv=argv, options=resume.OPTION)


if __name__ == "__main__":
    sys.exit(main())
