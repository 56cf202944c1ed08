"""How the alignment stages (ppo, dpo, grpo) measure a chat policy on held-out prompts, the same way each, so the
report card can set them side by side: ground-truth exact match (greedy replies), the learned reward model's
score of those replies, and the KL divergence from the frozen starting policy.

KL is measured along the policy's own samples (temperature 1, seeded): the mean over prompts of
sum_t KL(pi(. | x, y_<t) || pi_ref(. | x, y_<t)), exact over the vocabulary at each position, so never negative
and far less noisy than summed log-ratios.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from lmforge.data import posttrain_data
from lmforge.chat import end_token_id
from lmforge.errors import InputError


def load_policy(path: Path):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").exists():
        raise InputError(f"{path}: not a model folder (no config.json; run the stage that makes the policy)")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)


def load_models(policy: Path, reward_model: Path, pad_token_id: int, device):
    """(trainable policy, frozen copy of it as the reference, frozen reward model), all on `device`."""
    from lmforge.training.scoring import load_reward_model

    model = load_policy(policy).to(device)
    ref = load_policy(policy).to(device).eval().requires_grad_(False)
    rm = load_reward_model(reward_model, pad_token_id).to(device).eval().requires_grad_(False)
    return model, ref, rm


def check_same_tokenizer(tok, policy: Path, reward_model: Path) -> None:
    """The reward model must read the policy's token ids as the same text."""
    from lmforge.models import load_tokenizer

    if (Path(reward_model) / "tokenizer_config.json").exists() and load_tokenizer(reward_model).get_vocab() != tok.get_vocab():
        raise InputError(f"{reward_model}: its tokenizer differs from the policy's ({policy}); both must share one")


def query_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """A prompt through the chat template, ending with the assistant tag the policy continues from."""
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, width - len(r):] = torch.tensor(r)
        mask[j, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def replies(policy, tokenizer, queries: list[list[int]], *, batch_size: int, max_new_tokens: int,
            temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """The policy's reply to each query (greedy at temperature 0), cut after its first end-of-turn."""
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    sample = temperature > 0
    torch.manual_seed(seed)
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(queries), batch_size):
        chunk = queries[i : i + batch_size]
        ids, mask = _left_padded(chunk, pad_id)
        extra = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}
        gen = policy.generate(
            input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device), do_sample=sample,
            max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id, **extra,
        )
        for row in gen[:, ids.shape[1]:].tolist():
            reply = row[: row.index(end_id) + 1] if end_id in row else row
            out.append([t for t in reply if t != pad_id])
    policy.train(was_training)
    return out


def _answer_logits(model, queries, answers, pad_id, batch_size):
    """Per pair, the log-softmax rows that predict the answer's tokens (answer length x vocab), in batches."""
    for i in range(0, len(queries), batch_size):
        seqs = [q + a for q, a in zip(queries[i : i + batch_size], answers[i : i + batch_size])]
        ids, mask = _left_padded(seqs, pad_id)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # row t predicts token t + 1
        for j, a in enumerate(answers[i : i + batch_size]):
            yield logp[j, logp.shape[1] - len(a):] if a else logp[j, :0], ids[j, ids.shape[1] - len(a):]


@torch.no_grad()
def reply_logprobs(model, queries: list[list[int]], answers: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """log p(answer | query) under `model`, summed over the answer's tokens, one value per pair."""
    was_training = model.training
    model.eval()
    out = [rows.gather(-1, tok[:, None].to(rows.device)).sum().cpu()
           for rows, tok in _answer_logits(model, queries, answers, pad_id, batch_size)]
    model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0)


@torch.no_grad()
def kl_along(policy, ref, queries: list[list[int]], answers: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Per reply, sum over its positions of the exact KL(policy || ref) of the next-token distributions.
    Along replies sampled from the policy this estimates the sequence KL without the sign noise of log-ratios."""
    was = policy.training, ref.training
    policy.eval(), ref.eval()
    out = []
    for (p, _), (q, _) in zip(_answer_logits(policy, queries, answers, pad_id, batch_size),
                              _answer_logits(ref, queries, answers, pad_id, batch_size)):
        out.append((p.exp() * (p - q)).sum().cpu())
    policy.train(was[0]), ref.train(was[1])
    return torch.stack(out) if out else torch.zeros(0)


def preference_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 64) -> float:
    """Share of preference pairs where the model itself gives the chosen reply the higher log-probability."""
    from lmforge.training.scoring import chat_ids

    queries = [query_ids(tokenizer, p["prompt"]) for p in pairs]

    def replies_of(key: str) -> list[list[int]]:  # the reply's tokens: the conversation past its prompt
        return [chat_ids(tokenizer, p["prompt"] + p[key])[len(q):] for p, q in zip(pairs, queries)]

    chosen = reply_logprobs(model, queries, replies_of("chosen"), tokenizer.pad_token_id, batch_size)
    rejected = reply_logprobs(model, queries, replies_of("rejected"), tokenizer.pad_token_id, batch_size)
    return round((chosen > rejected).float().mean().item(), 4)


def measure(policy, tokenizer, rows: list[dict], *, batch_size: int, max_new_tokens: int, suffix: str = "",
            reward_model=None, ref=None, seed: int = 0, temperature: float = 0.0) -> tuple[dict, list[dict]]:
    """Held-out metrics of a policy on prompt rows ({"prompt", "answer", "task"}), keys ending in `suffix`,
    and one sample per row. Replies are greedy (temperature 0) or sampled with `seed`. rm_score needs
    `reward_model`; kl_ref needs `ref`."""
    from lmforge.training.scoring import score_ids

    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    queries = [query_ids(tokenizer, r["prompt"]) for r in rows]
    greedy = replies(policy, tokenizer, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed)
    texts = tokenizer.batch_decode(greedy, skip_special_tokens=True)
    correct = [posttrain_data.score(t, r["answer"]) for t, r in zip(texts, rows)]
    by_task = defaultdict(list)
    for c, r in zip(correct, rows):
        by_task[r["task"]].append(c)
    metrics = {
        f"gt_accuracy{suffix}": round(sum(correct) / len(correct), 4),
        f"end_rate{suffix}": round(sum(end_id in r for r in greedy) / len(greedy), 4),
        f"reply_tokens{suffix}": round(sum(map(len, greedy)) / len(greedy), 2),
        f"gt_accuracy_by_task{suffix}": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
    }
    scores = [None] * len(rows)
    if reward_model is not None:
        s = score_ids(reward_model, [q + r for q, r in zip(queries, greedy)], pad_id)
        metrics[f"rm_score{suffix}"] = round(s.mean().item(), 4)
        scores = [round(x, 4) for x in s.tolist()]
    if ref is not None:
        sampled = replies(policy, tokenizer, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          temperature=1.0, seed=seed)
        metrics[f"kl_ref{suffix}"] = round(kl_along(policy, ref, queries, sampled, pad_id, batch_size).mean().item(), 4)
    samples = [{"text": t, "rm_score": s, "correct": c} for t, s, c in zip(texts, scores, correct)]
    return metrics, samples


def measure_start(policy_dir: Path, reward_model_dir: Path, policy, tokenizer, rows: list[dict], *, batch_size: int,
                  max_new_tokens: int, reward_model, suffix: str = "", seed: int = 0,
                  temperature: float = 0.0) -> tuple[dict, list[dict]]:
    """`measure` of a stage's starting policy (no `ref`), kept in the user's cache under a digest of all it reads:
    every file of the policy and reward-model folders, the prompts, the settings, the code that measures and the
    machine. ppo, dpo and grpo usually start from one policy on the same held-out prompts; the first of them
    generates and scores, the others read its result (a minute each for a 135M model on a 2-core CPU)."""
    import hashlib
    import os
    import platform
    import sys

    import transformers

    from lmforge.runtime import cpu_flags, kept_cache
    from lmforge.training import scoring

    h = hashlib.blake2b(digest_size=16)
    for folder in (policy_dir, reward_model_dir):
        for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            h.update(str(f.relative_to(folder)).encode())
            with f.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
    for module in (sys.modules[__name__], scoring, posttrain_data):
        h.update(Path(module.__file__).read_bytes())
    machine = (torch.__version__, transformers.__version__, str(policy.device), torch.get_num_threads(),
               platform.machine(), sorted(cpu_flags()))
    settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, suffix=suffix, seed=seed,
                    temperature=float(temperature))
    h.update(json.dumps([rows, settings, machine], sort_keys=True).encode())
    kept = kept_cache() / "policy-eval" / f"{h.hexdigest()}.json"
    if kept.exists():
        print(f"policy_eval: the starting policy's held-out figures read from {kept} (same files, prompts, settings "
              "and machine)", file=sys.stderr)
        found = json.loads(kept.read_text())
        return found["metrics"], found["samples"]
    metrics, samples = measure(policy, tokenizer, rows, reward_model=reward_model, **settings)
    try:  # written beside, then renamed: a reader never sees half a file
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"metrics": metrics, "samples": samples}))
        tmp.rename(kept)
    except OSError:  # a read-only cache: the figures are still returned
        pass
    return metrics, samples


def write_samples(path: Path, rows: list[dict], before: list[dict], after: list[dict]) -> None:
    """One JSON line per held-out prompt: its question, answer and task, and the policy's reply before and after."""
    with Path(path).open("w") as fh:
        for row, b, a in zip(rows, before, after):
            fh.write(json.dumps({"prompt": row["prompt"][-1]["content"], "answer": row["answer"],
                                 "task": row["task"], "before": b, "after": a}) + "\n")


def write_curves(path: Path, rows: list[dict]) -> None:
    """Training curves as CSV: a step column, then every logged figure (just the header when none was logged)."""
    columns = ["step", *dict.fromkeys(k for r in rows for k in r if k != "step")]
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
