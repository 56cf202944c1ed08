"""The decoder lmforge pretrains and what its training loop needs around it: packed token arrays, the
Llama-style model from its knobs, the AdamW parameter groups, the learning-rate schedule, the device and
precision, the FLOPs per token, and the loop's resumable checkpoints. Shared by the pretrain stage and the benchmarks (bench/), which must
measure the very model and data the stage trains."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge import distributed
from lmforge.config import PretrainConfig
from lmforge.data.corpus import iter_texts
from lmforge.runtime import pick_device
from lmforge.errors import InputError


def tokenize_split(tokenizer, corpus: Path, split: str, source: str | None = None) -> np.ndarray:
    """All documents of a split as one flat token array, each document followed by eos."""
    ids: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.append(np.asarray(row + [tokenizer.eos_token_id], dtype=np.int32))
        batch.clear()

    for text in iter_texts(corpus, split, source):
        batch.append(text)
        if len(batch) == 512:
            flush()
    if batch:
        flush()
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows from the start of held-out tokens: the same ones every evaluation."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n == 0:  # a source with little held-out text still gets one (shorter) window
        return torch.from_numpy(tokens[None, :].astype(np.int64))
    return torch.from_numpy(tokens[: n * seq_len + 1].astype(np.int64)).unfold(0, seq_len + 1, seq_len)[:n]


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise InputError(
            f"pretrain.hidden_size ({cfg.hidden_size}) must divide by num_heads ({cfg.num_heads}), "
            f"and num_heads by num_kv_heads ({cfg.num_kv_heads})"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_device(cfg: PretrainConfig) -> tuple[torch.device, torch.dtype | None]:
    device = pick_device(cfg.device, "pretrain")  # under torchrun, the GPU of the local rank
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return device, torch.bfloat16
    return device, None  # fp32


def flops_per_token(model, seq_len: int, n_params: int | None = None) -> float:
    """6N for the matmuls (embedding lookup excluded, tied head included) plus attention's 12*L*d*T.
    `n_params`: the full count where the model's own parameters are shards (FSDP)."""
    cfg = model.config
    total = n_params if n_params is not None else sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    n = total - (0 if cfg.tie_word_embeddings else embed)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ------------------------------------------------------------------------------------------ checkpoints
def fingerprint(cfg: PretrainConfig, train_tokens: np.ndarray) -> str:
    """Identifies a training run: a checkpoint is resumed only by the run that wrote it."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    h.update(train_tokens[:100_000].tobytes())
    h.update(str(len(train_tokens)).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, step: int, model, optimizer, rng: torch.Generator, fp: str, history: dict) -> None:
    """Every process calls it (gathering FSDP shards is collective); rank 0 writes. The full, unsharded state
    makes the checkpoint independent of the number of processes that resume it."""
    model_state, optim_state = distributed.full_state(model, optimizer)
    if not distributed.is_main():
        return
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "last.pt.tmp"
    torch.save(
        {"step": step, "model": model_state, "optimizer": optim_state, "rng": rng.get_state(),
         "fingerprint": fp, "history": history, "format": _state_format()},
        tmp,
    )
    tmp.replace(path / "last.pt")


def _state_format() -> str:
    # FSDP's full optimizer state is keyed by parameter name, a plain optimizer's by position
    return "fsdp" if distributed.strategy() == "fsdp" and distributed.is_worker() else "plain"


def load_checkpoint(path: Path, fp: str) -> dict | None:
    file = path / "last.pt"
    if not file.exists():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except pickle.UnpicklingError as err:
        raise InputError(f"{file}: not a checkpoint lmforge wrote (it holds objects beyond tensors and plain data, "
                         f"and loading those could run code): delete it to start over ({str(err).splitlines()[0]})") from None
    if state.get("fingerprint") != fp:
        print(f"pretrain: ignoring {file}: written by a different config or corpus", file=sys.stderr)
        return None
    if state.get("format", "plain") != _state_format():
        print(f"pretrain: ignoring {file}: written under launch.strategy {'fsdp' if state.get('format') == 'fsdp' else 'ddp'}"
              ", which this run does not use", file=sys.stderr)
        return None
    return state
