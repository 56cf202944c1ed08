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
import time
from pathlib import Path

from lmforge import distributed
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.training.callbacks import ForwardLogs
from lmforge.config import DpoConfig
from lmforge.models import load_tokenizer, set_generation_defaults
from lmforge.training.policy_eval import check_same_tokenizer, load_models, measure, preference_accuracy, write_samples
from lmforge.runtime import pick_device
from lmforge.stats import paired_gain
from lmforge.errors import InputError
from lmforge.stage import cli, write_meta
from lmforge.tracking import Tracker

TRAINER_TMP = "_trainer_tmp"
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
        output_dir=str(work),
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
        logging_steps=cfg.log_every,
        logging_first_step=True,
        eval_strategy="no",
        **resume.save_args(work if checkpoints else None, cfg.checkpoint_every),  # resumable: see lmforge.training.resume
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        activation_checkpointing=False,  # TRL turns it on by default; pointless for small models, and slower
        dataloader_num_workers=0,
        **distributed.trainer_args(),
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

    device = pick_device(cfg.device, "dpo", cfg.num_threads)
    set_seed(cfg.seed)
    model, ref, rm = load_models(policy, reward_model, tok.pad_token_id, device)
    tracker.log_params({"n_params": sum(p.numel() for p in model.parameters()), "pairs_total": len(train),
                        "device_used": device.type})
    kw = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, reward_model=rm, seed=cfg.seed)
    before, samples_before = measure(model, tok, test, suffix="_before", **kw)
    before["pref_accuracy_before"] = preference_accuracy(model, tok, test_pairs, cfg.eval_batch_size)
    tracker.log_metrics({k: v for k, v in before.items() if not isinstance(v, dict)}, step=0)

    history: list[dict] = []
    checkpoint = resume.start("dpo", checkpoints, resume.fingerprint(cfg, [policy], train))
    work = checkpoints or out / TRAINER_TMP
    trainer = make_trainer(cfg, model, ref, tok, train, test_pairs, work, device.type, tracker, history,
                           checkpoints=checkpoints is not None)
    ForwardLogs(tracker, history).replay(resume.earlier_logs(checkpoint))  # the killed attempt's first losses
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_s = time.perf_counter() - t0
    final = trainer.evaluate()
    resume.finish(work)  # done: a later run starts fresh
    model = trainer.model

    after, samples_after = measure(model, tok, test, ref=ref, **kw)
    after["pref_accuracy"] = preference_accuracy(model, tok, test_pairs, cfg.eval_batch_size)
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    metrics = {
        **after, **before,
        # on the same held-out items, with its 95% paired-bootstrap interval (lmforge.stats)
        "gt_accuracy_gain": paired_gain([x["correct"] for x in samples_before], [x["correct"] for x in samples_after]),
        "implicit_reward_accuracy": round(final["eval_rewards/accuracies"], 4),
        "implicit_reward_margin": round(final["eval_rewards/margins"], 4),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "resumed_from_step": resume.step_of(checkpoint),
        "steps": result.global_step, "train_pairs": len(train), "test_pairs": len(test_pairs),
        "test_prompts": len(test), "train_s": round(train_s, 2),
    }

    write_samples(out / "samples.jsonl", test, samples_before, samples_after)
    tracker.log_artifact(out / "samples.jsonl")

    model_dir = out / "model"
    set_generation_defaults(model, tok)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_meta(model_dir, "dpo", cfg, metrics, {"policy": policy, "reward_model": reward_model})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("dpo", run, inputs=("policy", "reward_model"), argv=argv, options={
        "checkpoints": {"type": Path, "default": None, "help": "scratch folder for resumable checkpoints (not an output)"}})


if __name__ == "__main__":
    sys.exit(main())
