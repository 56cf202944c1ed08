"""pretrain: a Llama-style decoder from random init (or a given causal LM), causal-LM objective on packed sequences.

Tokenises the corpus once into flat arrays (tokenisation stays off the hot path), then trains with
AdamW (or Muon for the hidden matrices and AdamW for the rest: `optimizer`), linear warm-up and cosine decay,
gradient clipping and accumulation, bf16 autocast on CUDA.
Evaluates held-out loss per source, checkpoints periodically and resumes from the last checkpoint
when it was written by the same config and data. Output loads with `AutoModelForCausalLM`.

When the base stage wrote a pretrained model (`base.source`), the stage continues training it (continued
pretraining on the mix) with its own tokenizer, which the tokenizer stage kept; the size knobs are then unused.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmforge import distributed
from lmforge.config import PretrainConfig
from lmforge.data.corpus import source_names
from lmforge.lm import (build_model, eval_windows, fingerprint, flops_per_token, load_checkpoint, lr_at, param_groups,
                        resolve_device, save_checkpoint, tokenize_split)
from lmforge.models import NOT_WRITTEN, check_weights, context_length, read_tokenizer
from lmforge.errors import InputError
from lmforge.runtime import native_bf16
from lmforge.stage import cli, write_meta
from lmforge.training import muon
from lmforge.tracking import Tracker


# --------------------------------------------------------------------------------------------- model
def load_base(base: Path):
    """The base stage's model (its embeddings already match the tokenizer stage's copy of its tokenizer)."""
    from transformers import AutoModelForCausalLM

    check_weights(base, "base model")
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)


def new_model(cfg: PretrainConfig, tok, base: Path | None):
    return load_base(base) if base else build_model(cfg, tok)


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], batch_size: int, device, autocast) -> dict[str, float]:
    """Mean held-out loss per source and overall (token-weighted)."""
    model.eval()
    out, total, count = {}, 0.0, 0
    for source, data in windows.items():
        loss_sum, tokens = 0.0, 0
        for i in range(0, len(data), batch_size):
            batch = data[i : i + batch_size].to(device)
            with autocast():
                logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            loss_sum += loss.item()
            tokens += batch[:, 1:].numel()
        out[source] = loss_sum / tokens
        total, count = total + loss_sum, count + tokens
    out["all"] = total / count
    model.train()
    return out


def write_curves(folder: Path, history: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in history.items():
        if not rows:
            continue
        with (folder / f"{name}.csv").open("w", newline="") as fh:
            fields = list(dict.fromkeys(k for row in rows for k in row))  # union, in first-seen order
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> str:
    model.eval()
    blocks = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        blocks.append(f"### {prompt!r}\n{tokenizer.decode(gen[0], skip_special_tokens=False)}\n")
    model.train()
    return "\n".join(blocks)


# ------------------------------------------------------------------------------------------- stage
@dataclass
class Run:
    """What the steps of one pretraining run share: its knobs and device, the model and optimizer, the batch
    generator, the logged history and where a resumed run started."""

    cfg: PretrainConfig
    tracker: Tracker
    device: torch.device
    amp_dtype: torch.dtype | None
    checkpoints: Path | None
    local_batch: int  # this process's share of batch_size
    model: Any = None
    optimizer: Any = None
    rng: torch.Generator | None = None
    fp: str = ""
    history: dict = field(default_factory=lambda: {"train": [], "val": []})
    start_step: int = 0
    train_time: float = 0.0
    base: Path | None = None  # the base stage's model this run continues, if any

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


def run(cfg: PretrainConfig, *, corpus: Path, tokenizer: Path, out: Path, tracker: Tracker,
        checkpoints: Path | None = None, base: Path | None = None) -> dict:
    """Pretrain a Llama-style model (or continue the base stage's) on the mixed corpus."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    base = None if base is None or (Path(base) / NOT_WRITTEN).is_file() else Path(base)
    if cfg.optimizer == "muon" and distributed.world_size() > 1 and distributed.strategy() == "fsdp":
        raise InputError("pretrain.optimizer muon orthogonalises whole matrices and FSDP shards them: "
                         "use launch.strategy ddp, or pretrain.optimizer adamw")
    if base:
        print(f"pretrain: continuing the base model in {base}", file=sys.stderr)
        if (context := context_length(base)) and cfg.seq_len > context:
            raise InputError(f"pretrain.seq_len ({cfg.seq_len}) is longer than the base model's context ({context})")
    tok = read_tokenizer(tokenizer)
    device, amp_dtype = resolve_device(cfg)
    distributed.init(device)
    r = Run(cfg, tracker, device, amp_dtype, checkpoints, distributed.per_process(cfg.batch_size, "pretrain.batch_size"))

    train, val_windows = read_data(cfg, tok, corpus)
    r.model, r.optimizer = make_model(cfg, tok, device, base)
    r.base = base
    r.rng = torch.Generator().manual_seed(cfg.seed)
    r.fp = fingerprint(cfg, train)
    resume_run(r)
    n_params, fpt = model_size(r)
    tracker.log_params({"n_params": n_params, "train_tokens": len(train), "resolved_device": device.type,
                        "resolved_dtype": "bf16" if amp_dtype else "fp32", "processes": distributed.world_size()})

    train_loop(r, train, val_windows, fpt)
    model_dir = save_outputs(r, tok, out)
    if model_dir is None:  # not the main process
        return {}
    metrics = final_metrics(r, train, n_params, fpt)
    write_meta(model_dir, "pretrain", cfg, metrics, {"corpus": corpus, "tokenizer": tokenizer, "base": base or ""})
    return metrics


# -------------------------------------------------------------------------------------------- data
def read_data(cfg: PretrainConfig, tok, corpus: Path) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Tokenise once: training samples random windows of the train split, evaluation fixed ones per source."""
    train = tokenize_split(tok, corpus, "train")
    if len(train) < cfg.seq_len + 1:
        raise InputError(f"training split of {corpus} has {len(train)} tokens, fewer than pretrain.seq_len + 1")
    val = {s: tokenize_split(tok, corpus, "val", s) for s in source_names(corpus, "val")}
    val_windows = {s: eval_windows(t, cfg.seq_len, cfg.eval_batches * cfg.batch_size) for s, t in val.items() if len(t) > 1}
    if not val_windows:
        raise InputError(f"{corpus} has no held-out text to evaluate on")
    return train, val_windows


# ------------------------------------------------------------------------------------------- model
def make_model(cfg: PretrainConfig, tok, device, base: Path | None):
    """The model (random init or the base's) on `device`, compiled if asked, spread over the processes; its
    optimizer (AdamW, or Muon for the hidden matrices)."""
    model = new_model(cfg, tok, base).to(device)
    if cfg.compile:
        model.compile()  # in place: parameter names, checkpoints and save_pretrained are unchanged
    model = distributed.wrap(model, device)  # DDP or FSDP over the processes; unchanged with one
    if cfg.optimizer == "muon":  # bf16 orthogonalisation only where it is native: emulated, 30-50x fp32's time
        groups = muon.param_groups(distributed.unwrap(model), cfg.weight_decay)
        ns_dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        return model, muon.MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), ns_dtype=ns_dtype)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )
    return model, optimizer


def resume_run(r: Run) -> None:
    """Go on from the run's last checkpoint, if this very run (config and data) wrote one."""
    state = load_checkpoint(r.checkpoints, r.fp) if r.checkpoints else None
    if state:
        distributed.load_full_state(r.model, r.optimizer, state["model"], state["optimizer"])
        r.rng.set_state(state["rng"])
        r.start_step, r.history = state["step"], state["history"]
        print(f"pretrain: resumed from {r.checkpoints / 'last.pt'} at step {r.start_step} "
              f"({distributed.world_size()} process(es))", file=sys.stderr)


def model_size(r: Run) -> tuple[int, float]:
    """Parameters (all of them where FSDP holds shards) and training FLOPs per token."""
    plain = distributed.unwrap(r.model)
    n_params = sum(p.numel() for p in plain.parameters())
    if distributed.strategy() == "fsdp" and distributed.is_worker():
        n_params = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in plain.parameters())
    return n_params, flops_per_token(plain, r.cfg.seq_len, n_params)


# -------------------------------------------------------------------------------------------- loop
def train_loop(r: Run, train: np.ndarray, val_windows: dict[str, torch.Tensor], fpt: float) -> None:
    """From the start (or resumed) step to max_steps: logs every log_every steps, evaluates every eval_every,
    checkpoints every checkpoint_every (not after the last)."""
    cfg, model, optimizer = r.cfg, r.model, r.optimizer
    rank, local_batch = distributed.rank(), r.local_batch
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    train_t = torch.from_numpy(train.astype(np.int64))
    if r.start_step == 0:
        log_eval(r, val_windows, 0)
    model.train()
    bar = tqdm(range(r.start_step, cfg.max_steps), desc="pretrain", unit="step", initial=r.start_step,
               total=cfg.max_steps, dynamic_ncols=True, mininterval=1.0, disable=not distributed.is_main())
    t_last, tokens_since = time.perf_counter(), 0
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_acc = 0.0
        for micro in range(cfg.grad_accum):
            # every process draws the same global batch (same generator state) and takes its own share of it:
            # the gradient, averaged over processes by DDP/FSDP, is the one-process gradient of that batch
            starts = torch.randint(0, len(train_t) - cfg.seq_len - 1, (cfg.batch_size,), generator=r.rng)
            mine = starts[rank * local_batch : (rank + 1) * local_batch].tolist()
            batch = torch.stack([train_t[s : s + cfg.seq_len + 1] for s in mine]).to(r.device, non_blocking=True)
            with r.autocast(), distributed.no_sync(model, last=micro == cfg.grad_accum - 1):
                logits = model(input_ids=batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
                (loss / cfg.grad_accum).backward()
            loss_acc += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            loss_val = distributed.mean((loss_acc / cfg.grad_accum).item())  # one sync per log interval
            now = time.perf_counter()
            elapsed, t_last = now - t_last, now
            r.train_time += elapsed
            tps = tokens_since / elapsed
            tokens_since = 0
            row = {"step": done, "train_loss": round(loss_val, 4), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                   "tokens_per_s": round(tps, 1), "flops_per_s": round(tps * fpt, 1)}
            r.history["train"].append(row)
            r.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            log_eval(r, val_windows, done)
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if r.checkpoints and (done % cfg.checkpoint_every == 0) and done < cfg.max_steps:
            save_checkpoint(r.checkpoints, done, model, optimizer, r.rng, r.fp, r.history)
            t_last = time.perf_counter()
    bar.close()


# -------------------------------------------------------------------------------------- evaluation
def log_eval(r: Run, val_windows: dict[str, torch.Tensor], step: int) -> dict:
    """Held-out loss per source and overall, into the history and the tracker (with perplexity)."""
    losses = evaluate(r.model, val_windows, r.cfg.batch_size, r.device, r.autocast)
    row = {"step": step, "val_loss": round(losses["all"], 4), **{f"val_loss_{s}": round(v, 4) for s, v in losses.items() if s != "all"}}
    r.history["val"].append(row)
    r.tracker.log_metrics({**{k: v for k, v in row.items() if k != "step"}, "val_ppl": math.exp(losses["all"])}, step=step)
    return row


def final_metrics(r: Run, train: np.ndarray, n_params: int, fpt: float) -> dict:
    cfg, history = r.cfg, r.history
    first, last = history["val"][0], history["val"][-1]
    train_rows = [row for row in history["train"] if row["step"] > r.start_step] or history["train"]
    mean_tps = float(np.mean([row["tokens_per_s"] for row in train_rows])) if train_rows else 0.0
    return {
        "n_params": n_params,
        "train_tokens_available": int(len(train)),
        "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "initial_val_loss": first["val_loss"],
        "final_val_loss": last["val_loss"],
        "final_val_ppl": round(math.exp(last["val_loss"]), 3),
        "final_train_loss": history["train"][-1]["train_loss"] if history["train"] else None,
        "initial_val_loss_by_source": {k.removeprefix("val_loss_"): v for k, v in first.items()
                                       if k.startswith("val_loss_")},
        "val_loss_by_source": {k.removeprefix("val_loss_"): v for k, v in last.items() if k.startswith("val_loss_")},
        "tokens_per_s": round(mean_tps, 1),
        "flops_per_s": round(mean_tps * fpt, 1),
        "train_time_s": round(r.train_time, 2),
        "device": r.device.type,
        "dtype": "bf16" if r.amp_dtype else "fp32",
        "resumed_from_step": r.start_step,
        "processes": distributed.world_size(),
    }


# -------------------------------------------------------------------------------------------- save
def save_outputs(r: Run, tok, out: Path) -> Path | None:
    """The model with its tokenizer and samples, and the curves, written by the main process (the others' `out`
    is thrown away); its model folder, or None in another process. The finished run's checkpoint goes."""
    cfg = r.cfg
    model_state, _ = distributed.full_state(r.model)  # every process: gathering FSDP shards is collective
    if r.checkpoints and distributed.is_main() and (r.checkpoints / "last.pt").exists():
        (r.checkpoints / "last.pt").unlink()  # finished: a later run starts fresh (or from its own checkpoints)
    distributed.close()
    if not distributed.is_main():
        return None
    model = distributed.unwrap(r.model)
    if distributed.strategy() == "fsdp" and distributed.is_worker():
        model = new_model(cfg, tok, r.base).to(r.device)
        model.load_state_dict(model_state)
    model_dir = out / "model"
    model.config.use_cache = True
    model.save_pretrained(model_dir)
    if not r.base:  # a base keeps the context it was pretrained for
        tok.model_max_length = cfg.seq_len
    tok.save_pretrained(model_dir)
    samples = generate_samples(model, tok, cfg.sample_prompts, cfg.sample_tokens, r.device)
    (model_dir / "samples.txt").write_text(samples)
    write_curves(out / "curves", r.history)
    r.tracker.log_artifact(model_dir / "samples.txt")
    r.tracker.log_artifact(out / "curves", "curves")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    return cli("pretrain", run, inputs=("corpus", "tokenizer"), argv=argv,
               options={"checkpoints": {"type": Path, "default": None, "help": "folder for resumable checkpoints"},
                        "base": {"type": Path, "default": None, "help": "the base stage's model folder, to continue"}})


if __name__ == "__main__":
    sys.exit(main())
