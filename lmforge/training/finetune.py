"""Chat fine-tuning shared by the sft and lora stages: their inputs, TRL's SFTTrainer with lmforge's knobs,
and the measurements before and after (held-out loss, greedy exact-answer accuracy).

The loss covers assistant tokens only: the chat template marks them with `{% generation %}`, TRL turns
that into `assistant_masks` and every other label into -100.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmforge import distributed
from lmforge.data import posttrain_data
from lmforge.training import resume
from lmforge.training.callbacks import ForwardLogs
from lmforge.training.skeleton import trainer_args
from lmforge.config import SftConfig
from lmforge.models import context_length, load_tokenizer, stop_token_ids
from lmforge.runtime import pick_device
from lmforge.errors import InputError
from lmforge.stats import paired_gain

SAMPLES = 20  # test answers kept in samples.jsonl
CORPUS = {"corpus": {"type": Path, "default": None, "help": "the mix's corpus, replayed when replay_share > 0"}}


# ------------------------------------------------------------------------------------------- data
def prepare(cfg: SftConfig, base: Path, stage: str, corpus: Path | None = None) -> tuple[Any, list[list[dict]], str]:
    """The base's tokenizer (checking the model folder's files too) and the training conversations (with replayed
    pretraining text from `corpus`), before anything heavy; then the device, and the seed set for what follows."""
    from transformers import set_seed

    tokenizer = load_tokenizer(base)
    train_convs = training_conversations(cfg, tokenizer, context_length(base))
    train_convs += replay(cfg, corpus, len(train_convs))
    device = pick_device(cfg.device, stage, cfg.num_threads).type
    set_seed(cfg.seed)
    return tokenizer, train_convs, device


def training_conversations(cfg: SftConfig, tokenizer=None, context: int | None = None) -> list[list[dict]]:
    """Built-in train conversations plus the user's files (validated first, so bad rows fail fast). With a
    tokenizer, a user row whose prompt leaves no room for its answer within max_length (and the model's
    `context`) is refused: truncation would cut the whole answer, and the row would teach nothing."""
    convs = []
    limit = min(cfg.max_length, context or cfg.max_length)
    for path in cfg.data_files:
        lines: list[int] = []
        rows = posttrain_data.load_jsonl(path, cfg.data_format, lines)
        found = posttrain_data.detect_kind(rows[0])
        if found not in ("messages", "prompt_completion"):
            raise InputError(f"{path}:1: sft needs messages or prompt_completion rows, this file is {found} data")
        for row, lineno in zip(rows, lines):
            conv = posttrain_data.to_messages(row)
            if tokenizer is not None:
                last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
                prompt = tokenizer.apply_chat_template(conv[:last], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
                if len(prompt) >= limit:
                    raise InputError(f"{path}:{lineno}: the prompt is {len(prompt)} tokens, so no answer token fits "
                                     f"in {limit} (max_length, or the model's context)")
            convs.append(conv)
    convs.extend(r["messages"] for r in posttrain_data.conversations("train", cfg.train_examples, cfg.seed))
    if not convs:
        raise InputError("no training data: train_examples is 0 and data_files is empty")
    return convs


def replay(cfg: SftConfig, corpus: Path | None, n_tasks: int) -> list[list[dict]]:
    """Pretraining text, replay_share of all training examples: pieces of the mix's train split, each the reply of
    an assistant turn with no question, so the loss falls on the text itself. Fine-tuning on chats alone made the
    default model forget plain text (held-out bits/byte several times the base's)."""
    if not cfg.replay_share:
        return []
    if corpus is None:
        raise InputError("replay_share > 0 needs the corpus (--corpus out/mix/corpus), or set replay_share: 0")
    import random

    from lmforge.data.corpus import iter_texts

    texts = [t for t in iter_texts(corpus, "train") if t.strip()]
    if not texts:
        raise InputError(f"{corpus}: no training text to replay")
    rng, want = random.Random(cfg.seed), round(n_tasks * cfg.replay_share / (1 - cfg.replay_share))
    width = min(cfg.replay_tokens, cfg.max_length) * 3  # characters: about that many tokens of English or code
    pieces = []
    for text in rng.sample(texts, min(want, len(texts))) + rng.choices(texts, k=max(0, want - len(texts))):
        start = rng.randrange(max(1, len(text) - width))
        pieces.append([{"role": "assistant", "content": text[start:start + width]}])
    return pieces


def conversation_dataset(convs: list[list[dict]]):
    from datasets import Dataset

    return Dataset.from_list([{"messages": m} for m in convs])


# ------------------------------------------------------------------------------------- evaluation
def generate_answers(model, tokenizer, prompts: list[list[dict]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding, decoded up to end-of-turn."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=len(prompts) <= batch_size):
        ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts[i : i + batch_size]
        ]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=stops, pad_token_id=pad,
            )
        for row in gen[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=False)
            out.append(posttrain_data.extract(text.replace(tokenizer.pad_token, "")))
    model.train(was_training)
    return out


def answer_accuracy(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int) -> tuple[dict, list[str]]:
    """Overall and per-task accuracy of greedy answers on rows with "messages" or "prompt", "answer", "task";
    and the answers."""
    prompts = [r["prompt"] if "prompt" in r else r["messages"][:-1] for r in rows]
    answers = generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens)
    hits: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(rows, answers):
        hits[r["task"]].append(posttrain_data.score(a, r["answer"]))
    total = [h for v in hits.values() for h in v]
    metrics = {"accuracy": sum(total) / len(total)}
    metrics.update({f"accuracy_{t}": sum(v) / len(v) for t, v in sorted(hits.items())})
    return metrics, answers


# --------------------------------------------------------------------------------------- training
def make_trainer(cfg: SftConfig, model, tokenizer, train_convs, test_rows, work: Path, device: str,
                 tracker, history: list[dict], peft_config=None, checkpoints: bool = False):
    """An SFTTrainer with lmforge's knobs: no report_to, loss on assistant tokens; with `checkpoints`, the last
    full checkpoint (model, optimizer, scheduler, RNG, step) every checkpoint_every steps in `work`."""
    from trl import SFTConfig as TrlSftConfig
    from trl import SFTTrainer

    max_length = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
    args = TrlSftConfig(
        max_steps=cfg.max_steps,
        per_device_train_batch_size=distributed.per_process(cfg.batch_size, "batch_size"),  # same global batch
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_length=max_length,
        assistant_only_loss=cfg.assistant_only_loss,
        # TRL 1.12's default "chunked_nll" (which skips the head's matmul on masked tokens) reads
        # lm_head.weight itself and breaks on PEFT's trainable-token wrapper around a tied head: there, plain
        # "nll", the same loss
        loss_type="nll" if getattr(peft_config, "trainable_token_indices", None) else "chunked_nll",
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        **trainer_args(cfg, work, device, checkpoints=checkpoints),  # bf16 on CUDA only: TRL defaults it on
    )
    return (packed_trainer_class() if cfg.padding_free else SFTTrainer)(
        model=model,
        args=args,
        data_collator=PackedBatches(tokenizer.pad_token_id, max_length) if cfg.padding_free else None,
        train_dataset=conversation_dataset(train_convs),
        eval_dataset=conversation_dataset([r["messages"] for r in test_rows]),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[ForwardLogs(tracker, history)],
    )


class PackedBatches:
    """A batch's conversations packed end to end into as few rows of `width` tokens as fit (first fit, longest
    first), position ids restarting at each conversation, from which transformers builds a block-diagonal causal
    mask (sdpa and eager alike): the loss of the padded batch without its padding. Rows rather than one long row,
    because attention costs the square of a row's length. The tail of a row is padding with labels -100."""

    def __init__(self, pad_token_id: int, width: int):
        self.pad, self.width = pad_token_id, width

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rows: list[list[dict]] = []
        used: list[int] = []
        for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
            n = len(ex["input_ids"])
            i = next((i for i, u in enumerate(used) if u + n <= self.width), len(rows))
            if i == len(rows):
                rows.append([])
                used.append(0)
            rows[i].append(ex)
            used[i] += n
        width = max(used)
        ids = torch.full((len(rows), width), self.pad)
        labels = torch.full((len(rows), width), -100)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex["input_ids"])
                ids[i, at:at + n] = torch.tensor(ex["input_ids"])
                labels[i, at + 1:at + n] = torch.tensor(ex.get("labels", ex["input_ids"])[1:])  # none across a seam
                positions[i, at:at + n] = torch.arange(n)
                at += n
            positions[i, at:] = torch.arange(width - at)  # the padding is a sequence of its own, never scored
        return {"input_ids": ids, "labels": labels, "position_ids": positions, REAL_TOKENS: torch.tensor(sum(used))}


REAL_TOKENS = "lmforge_real_tokens"  # a packed batch's token count, read (and removed) by PackedSftTrainer


def packed_trainer_class():
    """TRL's SFTTrainer, counting a packed batch's tokens itself: TRL counts a batch without an attention mask as
    one row's width (it expects a single row), which would under-count the logged num_tokens."""
    from trl import SFTTrainer

    class PackedSftTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop(REAL_TOKENS, None)
            before = self._total_train_tokens
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if real is not None and self._total_train_tokens != before:  # a training step, which TRL counted
                self._total_train_tokens = before + int(self.accelerator.gather_for_metrics(real).sum().item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out

    return PackedSftTrainer


def finetune(cfg: SftConfig, model, tokenizer, train_convs: list[list[dict]], out: Path, tracker, device: str,
             peft_config=None, checkpoints: Path | None = None, fp: str = "") -> tuple[Any, dict]:
    """Measure the base, train, measure again. Returns the trainer (its .model is the trained model) and metrics.
    With `checkpoints` (a scratch folder, not an output), training resumes from the last checkpoint there that
    the same run (`fp`, see lmforge.training.resume.fingerprint) wrote, and the folder is removed once training is done."""
    test_rows = posttrain_data.conversations("test", cfg.test_examples, cfg.seed)
    if not getattr(model, "is_loaded_in_4bit", False):  # quantized models are placed by device_map already
        model.to(device)
    base_acc, base_answers = answer_accuracy(model, tokenizer, test_rows, cfg.eval_batch_size, cfg.max_new_tokens)

    history: list[dict] = []
    stage = type(cfg).__name__.removesuffix("Config").lower()
    with resume.Resumable(stage, checkpoints, fp, out) as run:
        trainer = make_trainer(cfg, model, tokenizer, train_convs, test_rows, run.work, device, tracker, history,
                               peft_config, checkpoints=run.saves)
        base_eval = trainer.evaluate()
        result = run.train(trainer.train, ForwardLogs(tracker, history))
    # eval_every dividing max_steps: the trainer has just measured these weights at the last step; else once more
    last = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == result.global_step]
    final_eval = last[-1] if last else trainer.evaluate()

    final_acc, final_answers = answer_accuracy(trainer.model, tokenizer, test_rows, cfg.eval_batch_size, cfg.max_new_tokens)
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    metrics = {
        "resumed_from_step": run.step,
        "train_conversations": len(train_convs),
        "test_conversations": len(test_rows),
        "steps": result.global_step,
        "train_time_s": round(run.seconds, 2),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "base_eval_loss": base_eval["eval_loss"],
        "final_eval_loss": final_eval["eval_loss"],
        **{f"base_{k}": v for k, v in base_acc.items()},
        **{f"final_{k}": v for k, v in final_acc.items()},
        # on the same held-out items, with its 95% paired-bootstrap interval (lmforge.stats)
        "accuracy_gain": paired_gain([posttrain_data.score(a, r["answer"]) for r, a in zip(test_rows, base_answers)],
                                     [posttrain_data.score(a, r["answer"]) for r, a in zip(test_rows, final_answers)]),
    }
    samples = out / "samples.jsonl"
    with samples.open("w") as fh:
        for r, b, f in list(zip(test_rows, base_answers, final_answers))[:SAMPLES]:
            fh.write(json.dumps({"question": r["messages"][0]["content"], "answer": r["answer"], "base": b, "final": f}) + "\n")
    tracker.log_artifact(samples)
    return trainer, metrics
