"""reward: a reward model (one scalar per conversation) trained from the SFT model on preference pairs.

The SFT model's body gets a fresh linear score head (`AutoModelForSequenceClassification`, num_labels=1),
read at the conversation's last token, and TRL's `RewardTrainer` fits it with the pairwise loss
-log sigmoid(r(x, chosen) - r(x, rejected)). Measured before and after training on held-out data:
pairwise accuracy and mean margin on `preference_pairs("test")`, and agreement with the ground-truth
rule: on held-out prompts, does a correct answer outscore a wrong one (per task too)?
Output: out/model loads with `AutoModelForSequenceClassification`, tokenizer beside it.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lmforge import distributed
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.training.callbacks import OnLog, numbers
from lmforge.config import RewardConfig
from lmforge.models import load_tokenizer
from lmforge.runtime import pick_device
from lmforge.training.scoring import load_reward_model, score_conversations
from lmforge.training.skeleton import log_before, save_model, trainer_args
from lmforge.errors import InputError
from lmforge.stage import cli
from lmforge.tracking import Tracker


# ---------------------------------------------------------------------------------------------- data
def _as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def user_pairs(files: list[str]) -> list[dict]:
    """Preference rows from user JSONL files, as chat messages (plain-text fields become one turn)."""
    rows = []
    for path in files:
        for row in posttrain_data.load_jsonl(path, "preference"):
            rows.append({
                "prompt": _as_messages(row["prompt"], "user"),
                "chosen": _as_messages(row["chosen"], "assistant"),
                "rejected": _as_messages(row["rejected"], "assistant"),
            })
    return rows


def ground_truth_cases(rows: list[dict], seed: int) -> list[dict]:
    """For each held-out prompt: its correct answer and a wrong one (another prompt's answer of the same
    task that the ground-truth scorer rejects), so agreement does not depend on how the pairs were built."""
    rng = random.Random(seed)
    by_task = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row["answer"])
    cases = []
    for row in rows:
        wrong = [a for a in by_task[row["task"]] if posttrain_data.score(a, row["answer"]) == 0.0]
        if wrong:
            cases.append({**row, "wrong": rng.choice(wrong)})
    return cases


# ----------------------------------------------------------------------------------------- measuring
def _share(wins: torch.Tensor, rows: list[dict]) -> tuple[float, dict[str, float]]:
    """Mean of 0/1 wins, overall and per task (rows from user files count as task "user")."""
    tasks = defaultdict(list)
    for i, row in enumerate(rows):
        tasks[row.get("task", "user")].append(i)
    return wins.mean().item(), {t: round(wins[idx].mean().item(), 4) for t, idx in sorted(tasks.items())}


def pairwise(model, tokenizer, pairs: list[dict]) -> dict:
    """Held-out pairwise accuracy (chosen outscores rejected) and mean margin."""
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    accuracy, by_task = _share((chosen > rejected).float(), pairs)
    return {"accuracy": accuracy, "margin": (chosen - rejected).mean().item(), "by_task": by_task}


def agreement(model, tokenizer, cases: list[dict]) -> dict:
    """Share of held-out prompts where the correct answer outscores the wrong one."""
    def conv(case, answer):
        return case["prompt"] + [{"role": "assistant", "content": answer}]

    right = score_conversations(model, tokenizer, [conv(c, c["answer"]) for c in cases])
    wrong = score_conversations(model, tokenizer, [conv(c, c["wrong"]) for c in cases])
    share, by_task = _share((right > wrong).float(), cases)
    return {"agreement": share, "by_task": by_task}


def measure(model, tokenizer, test_pairs: list[dict], cases: list[dict], suffix: str) -> dict:
    pw, gt = pairwise(model, tokenizer, test_pairs), agreement(model, tokenizer, cases)
    return {
        f"test_accuracy{suffix}": round(pw["accuracy"], 4),
        f"test_margin{suffix}": round(pw["margin"], 4),
        f"gt_agreement{suffix}": round(gt["agreement"], 4),
        f"test_accuracy_by_task{suffix}": pw["by_task"],
        f"gt_agreement_by_task{suffix}": gt["by_task"],
    }


# ------------------------------------------------------------------------------------------- training
def make_trainer(cfg: RewardConfig, model, tokenizer, train: list[dict], test: list[dict], total_steps: int, work: Path,
                 device: str, callbacks, checkpoints: bool = False):
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    args = TrlRewardConfig(
        per_device_train_batch_size=distributed.per_process(cfg.batch_size, "reward.batch_size"),
        per_device_eval_batch_size=64,
        max_steps=total_steps, learning_rate=cfg.lr, lr_scheduler_type="linear",
        warmup_steps=round(cfg.warmup_ratio * total_steps), weight_decay=cfg.weight_decay,
        center_rewards_coefficient=cfg.center_rewards or None, max_length=cfg.max_length,
        eval_strategy="steps", eval_steps=cfg.eval_every, dataset_num_proc=None,
        # bf16 off even on CUDA (TRL defaults it on); no first-step log
        **trainer_args(cfg, work, device, checkpoints=checkpoints, bf16=False, log_first=False),
    )
    return RewardTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in test]),
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: RewardConfig, *, sft: Path, out: Path, tracker: Tracker, checkpoints: Path | None = None) -> dict:
    """Train a reward model from the SFT model on preference pairs (pairwise loss)."""
    if not (Path(sft) / "config.json").exists():
        raise InputError(f"{sft}: not a model folder (no config.json; run the sft stage)")
    tok = load_tokenizer(sft)
    extra = user_pairs(cfg.data_files)  # bad user rows fail here, before any model loads
    train = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
             for r in posttrain_data.preference_pairs("train", cfg.train_pairs, cfg.seed)] + extra
    if not train:
        raise InputError("reward: no training pairs (train_pairs is 0 and no data_files)")
    test = posttrain_data.preference_pairs("test", cfg.test_pairs, cfg.seed)
    cases = ground_truth_cases(posttrain_data.prompts("test", cfg.gt_prompts, cfg.seed + 1), cfg.seed)

    device = pick_device(cfg.device, "reward", cfg.num_threads)
    torch.manual_seed(cfg.seed)  # the new score head
    model = load_reward_model(sft, tok.pad_token_id).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # names unlike the config keys: MLflow refuses to log a param twice with a different value
    tracker.log_params({"n_params": n_params, "pairs_total": len(train), "pairs_from_files": len(extra),
                        "device_used": device.type})

    before = measure(model, tok, test, cases, "_before")
    log_before(tracker, before)

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    losses: list[float] = []

    def forward(step: int, logs: dict) -> None:
        tracker.log_metrics(numbers(logs, "trainer/"), step=step)
        if "loss" in logs:
            losses.append(logs["loss"])

    # with --checkpoints (scratch, see lmforge.training.resume) the run continues from the last checkpoint it wrote there
    on_log = OnLog(forward)
    with resume.Resumable("reward", checkpoints, resume.fingerprint(cfg, [sft], train), out) as run:
        trainer = make_trainer(cfg, model, tok, train, test, total_steps, run.work, device.type, [on_log],
                               checkpoints=run.saves)
        result = run.train(trainer.train, on_log)  # with the killed attempt's curve and first loss
    model = trainer.model

    after = measure(model, tok, test, cases, "")
    metrics = {
        **after, **before,
        "resumed_from_step": run.step,
        "train_loss": round(result.training_loss, 4),  # after a resume: over the steps this run trained
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "steps": total_steps, "train_pairs": len(train), "user_pairs": len(extra),
        "test_pairs": len(test), "gt_cases": len(cases), "n_params": n_params,
    }

    save_model(out / "model", model, tok, "reward", cfg, metrics, {"sft": sft}, generation_defaults=False)  # scores, not chat
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("reward", run, inputs=("sft",), argv=argv, options=resume.OPTION)


if __name__ == "__main__":
    sys.exit(main())
