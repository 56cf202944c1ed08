"""ppo: RLHF with PPO: the policy learns to raise the reward model's score, held near its start by a KL penalty.

Policy = the SFT (or merged LoRA) model; reference = a frozen copy of it; reward = the reward model's
score of the finished turn (read at the end-of-turn token); value model = a trainable copy of the reward
model. Rollouts answer built-in training prompts through the chat template. Before and after training
the policy answers held-out prompts (greedy by default) and is measured by mean reward-model score and
by the ground-truth scorer. Optional quality gate: refuse a reward model whose held-out pairwise
accuracy is below `min_reward_accuracy`. The PPO algorithm itself lives behind `tasks.ppo_backend`.
Output: out/model (policy, loads with `AutoModelForCausalLM`, tokenizer beside it), out/curves.csv,
out/samples.jsonl.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from tasks import posttrain_data, ppo_backend
from tasks.chat import END
from tasks.config import PpoConfig
from tasks.callbacks import OnLog
from tasks.models import load_tokenizer
from tasks.runtime import pick_device
from tasks.scoring import ACCURACY_KEY, load_reward_model, score_ids
from tasks.stage import META_FILE, InputError, cli, read_json, write_meta
from tasks.tracking import Tracker


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


def load_policy(path: Path):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").exists():
        raise InputError(f"{path}: not a model folder (no config.json; run the stage that makes the policy)")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)


def training_prompts(cfg: PpoConfig) -> list[list[dict]]:
    prompts = [r["prompt"] for r in posttrain_data.prompts("train", cfg.train_prompts, cfg.seed)]
    for path in cfg.data_files:
        for row in posttrain_data.load_jsonl(path, "prompt"):
            p = row["prompt"]
            prompts.append([{"role": "user", "content": p}] if isinstance(p, str) else p)
    if len(prompts) < cfg.batch_size:
        raise InputError(f"ppo: {len(prompts)} training prompts, fewer than one batch ({cfg.batch_size})")
    return prompts


def query_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """A prompt through the chat template, ending with the assistant tag the policy continues from."""
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return ids["input_ids"]


# ---------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def answer(policy, tokenizer, queries: list[list[int]], cfg: PpoConfig) -> list[list[int]]:
    """The policy's reply to each query (left-padded batches), cut after its first end-of-turn."""
    end_id, pad_id = tokenizer.convert_tokens_to_ids(END), tokenizer.pad_token_id
    sample = cfg.eval_temperature > 0
    torch.manual_seed(cfg.seed)
    was_training = policy.training
    policy.eval()
    replies = []
    for i in range(0, len(queries), cfg.eval_batch_size):
        chunk = queries[i : i + cfg.eval_batch_size]
        width = max(len(q) for q in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, q in enumerate(chunk):
            ids[j, width - len(q):] = torch.tensor(q)
            mask[j, width - len(q):] = 1
        extra = {"temperature": cfg.eval_temperature, "top_k": 0, "top_p": 1.0} if sample else {}
        out = policy.generate(
            input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device), do_sample=sample,
            max_new_tokens=cfg.response_length, eos_token_id=end_id, pad_token_id=pad_id, **extra,
        )
        for row in out[:, width:].tolist():
            reply = row[: row.index(end_id) + 1] if end_id in row else row
            replies.append([t for t in reply if t != pad_id])
    policy.train(was_training)
    return replies


def evaluate(policy, reward_model, tokenizer, rows: list[dict], cfg: PpoConfig, suffix: str):
    """Mean reward-model score, ground-truth accuracy and end-of-turn rate of the replies to held-out rows."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    queries = [query_ids(tokenizer, r["prompt"]) for r in rows]
    replies = answer(policy, tokenizer, queries, cfg)
    scores = score_ids(reward_model, [q + r for q, r in zip(queries, replies)], tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(replies, skip_special_tokens=True)
    correct = [posttrain_data.score(t, r["answer"]) for t, r in zip(texts, rows)]
    by_task = defaultdict(list)
    for c, r in zip(correct, rows):
        by_task[r["task"]].append(c)
    metrics = {
        f"rm_score{suffix}": round(scores.mean().item(), 4),
        f"gt_accuracy{suffix}": round(sum(correct) / len(correct), 4),
        f"end_rate{suffix}": round(sum(end_id in r for r in replies) / len(replies), 4),
        f"reply_tokens{suffix}": round(sum(map(len, replies)) / len(replies), 2),
        f"gt_accuracy_by_task{suffix}": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
    }
    samples = [{"text": t, "rm_score": round(s, 4), "correct": c} for t, s, c in zip(texts, scores.tolist(), correct)]
    return metrics, samples


def write_curves(path: Path, rows: list[dict]) -> None:
    columns = ["step", *dict.fromkeys(k for r in rows for k in r if k != "step")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# -------------------------------------------------------------------------------------------- stage
def run(cfg: PpoConfig, *, policy: Path, reward_model: Path, out: Path, tracker: Tracker) -> dict:
    """PPO against the reward model with a KL penalty to the starting policy."""
    gate = check_gate(cfg, reward_model)  # before anything heavy
    tok = load_tokenizer(policy)
    rm_has_tok = (Path(reward_model) / "tokenizer_config.json").exists()
    if rm_has_tok and load_tokenizer(reward_model).get_vocab() != tok.get_vocab():
        raise InputError(f"{reward_model}: its tokenizer differs from the policy's ({policy}); both must share one")
    prompts = training_prompts(cfg)
    test = posttrain_data.prompts("test", cfg.test_prompts, cfg.seed)

    device = pick_device(cfg.device, "ppo", cfg.num_threads)
    model = load_policy(policy).to(device)
    ref = load_policy(policy).to(device).eval().requires_grad_(False)
    rm = load_reward_model(reward_model, tok.pad_token_id).to(device).eval().requires_grad_(False)
    value = load_reward_model(reward_model, tok.pad_token_id).to(device)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # names unlike the config keys: MLflow refuses to log a param twice with a different value
    tracker.log_params({"n_params": sum(p.numel() for p in model.parameters()), "prompts_total": len(prompts),
                        "device_used": device.type})

    before, samples_before = evaluate(model, rm, tok, test, cfg, "_before")
    tracker.log_metrics({k: v for k, v in before.items() if not isinstance(v, dict)}, step=0)

    curves: list[dict] = []
    names = ppo_backend.CURVES

    def collect(step: int, logs: dict) -> None:
        row = {"step": step, **{names[k]: logs[k] for k in names if k in logs}}
        if "ended" in row:  # a count of rollouts that closed their turn -> a rate
            row["end_rate"] = row.pop("ended") / cfg.batch_size
        curves.append(row)
        # "rollout/": statistics of each update's rollouts, unlike the held-out rm_score at the end
        tracker.log_metrics({f"rollout/{k}": v for k, v in row.items() if k != "step"}, step=step)

    t0 = time.perf_counter()
    ppo_backend.train(
        policy=model, ref_policy=ref, reward_model=rm, value_model=value, tokenizer=tok,
        queries=[query_ids(tok, p) for p in prompts], cfg=cfg, device=device.type,
        callbacks=[OnLog(collect)],
    )
    train_s = time.perf_counter() - t0
    changed = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())

    after, samples_after = evaluate(model, rm, tok, test, cfg, "")  # the runner logs the final metrics

    tail = curves[-5:]  # the last few updates, less noisy than the very last one
    metrics = {
        **after, **before,
        "rm_score_gain": round(after["rm_score"] - before["rm_score_before"], 4),
        "train_rm_score_first": round(curves[0]["rm_score"], 4) if curves else None,
        "train_rm_score_last": round(sum(r["rm_score"] for r in tail) / len(tail), 4) if tail else None,
        "kl_last": round(sum(r["kl"] for r in tail) / len(tail), 4) if tail else None,
        "kl_max": round(max(r["kl"] for r in curves), 4) if curves else None,
        "entropy_last": round(sum(r["entropy"] for r in tail) / len(tail), 4) if tail else None,
        "weights_changed": changed,
        "steps": cfg.steps, "episodes": cfg.steps * cfg.batch_size, "train_prompts": len(prompts),
        "test_prompts": len(test), "train_s": round(train_s, 2), "reward_accuracy_gate": gate,
    }

    write_curves(out / "curves.csv", curves)
    with (out / "samples.jsonl").open("w") as fh:
        for row, b, a in zip(test, samples_before, samples_after):
            fh.write(json.dumps({"prompt": row["prompt"][-1]["content"], "answer": row["answer"],
                                 "task": row["task"], "before": b, "after": a}) + "\n")
    tracker.log_artifact(out / "curves.csv")
    tracker.log_artifact(out / "samples.jsonl")

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_meta(model_dir, "ppo", cfg, metrics, {"policy": policy, "reward_model": reward_model})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("ppo", run, inputs=("policy", "reward_model"), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
