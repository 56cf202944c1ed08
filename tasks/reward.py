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
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from tasks import posttrain_data
from tasks.config import RewardConfig
from tasks.stage import InputError, cli, write_meta
from tasks.tracking import Tracker

ACCURACY_KEY = "test_accuracy"  # the held-out pairwise accuracy the ppo stage's quality gate reads


# -------------------------------------------------------------------------------------------- shared
def resolve_device(choice: str, stage: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{stage}.device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def load_tokenizer(model_dir: Path):
    """The tokenizer saved beside a model, checked for what post-training needs."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "tokenizer_config.json").exists():
        raise InputError(f"{model_dir}: no tokenizer beside the model (tokenizer_config.json missing)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template or tok.pad_token_id is None:
        raise InputError(f"{model_dir}: tokenizer lacks a chat template or a pad token")
    return tok


def load_reward_model(path: Path, pad_token_id: int):
    """A sequence classifier with one output; from a causal LM dir the score head starts random."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialised" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id  # where the classifier finds each sequence's last token
    return model


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """Reward of each token sequence (read at its last token), right-padded in batches."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        out.append(logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, exactly as RewardTrainer tokenizes it."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 64) -> torch.Tensor:
    return score_ids(model, [chat_ids(tokenizer, c) for c in conversations], tokenizer.pad_token_id, batch_size)


class OnLog(TrainerCallback):
    """Hands each log of a transformers/TRL trainer and its step to `fn`: how their curves reach our tracker."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.fn(state.global_step, dict(logs))


def numbers(logs: dict, prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: RewardConfig, *, sft: Path, out: Path, tracker: Tracker) -> dict:
    """Train a reward model from the SFT model on preference pairs (pairwise loss)."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

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

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, "reward")
    torch.manual_seed(cfg.seed)  # the new score head
    model = load_reward_model(sft, tok.pad_token_id).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # names unlike the config keys: MLflow refuses to log a param twice with a different value
    tracker.log_params({"n_params": n_params, "pairs_total": len(train), "pairs_from_files": len(extra),
                        "device_used": device.type})

    before = measure(model, tok, test, cases, "_before")
    tracker.log_metrics({k: v for k, v in before.items() if not isinstance(v, dict)}, step=0)

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    losses: list[float] = []

    def forward(step: int, logs: dict) -> None:
        tracker.log_metrics(numbers(logs, "trainer/"), step=step)
        if "loss" in logs:
            losses.append(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="lmforge-reward-") as workdir:
        args = TrlRewardConfig(
            output_dir=workdir, seed=cfg.seed, data_seed=cfg.seed,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
            max_steps=total_steps, learning_rate=cfg.lr, lr_scheduler_type="linear",
            warmup_steps=round(cfg.warmup_ratio * total_steps), weight_decay=cfg.weight_decay,
            center_rewards_coefficient=cfg.center_rewards or None, max_length=cfg.max_length,
            logging_steps=cfg.log_every, eval_strategy="steps", eval_steps=cfg.eval_every,
            save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
            bf16=False, activation_checkpointing=False,  # TRL defaults: bf16 on, checkpointing on
            dataloader_num_workers=0, dataset_num_proc=None,
        )
        trainer = RewardTrainer(
            model=model, args=args, processing_class=tok,
            train_dataset=Dataset.from_list(train),
            eval_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in test]),
            callbacks=[OnLog(forward)],
        )
        result = trainer.train()
    model = trainer.model

    after = measure(model, tok, test, cases, "")
    metrics = {
        **after, **before,
        "train_loss": round(result.training_loss, 4),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "steps": total_steps, "train_pairs": len(train), "user_pairs": len(extra),
        "test_pairs": len(test), "gt_cases": len(cases), "n_params": n_params,
    }

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_meta(model_dir, "reward", cfg, metrics, {"sft": sft})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("reward", run, inputs=("sft",), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
