"""distill: a small student learns from a real pretrained teacher (SmolLM2-135M by default) on the mix, beside a
control that learns from the data alone.

The student has pretrain's shape and the teacher's tokenizer (a logit-distillation loss needs one vocabulary).
Its loss per token is `kd_weight` x KL between the teacher's and its own next-token distributions (forward or
reverse, at `temperature`) plus the rest x cross-entropy on the data. The control is the same network from the
same initial weights, trained on the same batches for the same steps with cross-entropy alone, so the two
differ only by the teacher: the gain is the method's, at equal size and compute. Both are measured, with the
teacher, on the same held-out windows per source, in bits per byte (comparable with pretrain's model, whose
tokenizer differs), with a paired 95% interval of the student's gain over the control.

    <out>/model/     the student (tokenizer and chat template beside it): evaluate's `distill` variant
    <out>/control/   the control, the same way
    <out>/curves.csv step, loss and cross-entropy of both
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge import chat, pretrained
from lmforge.config import DistillConfig
from lmforge.data.corpus import source_names
from lmforge.errors import InputError
from lmforge.lm import build_model, eval_windows, lr_at, param_groups, tokenize_split
from lmforge.models import NOT_WRITTEN, set_generation_defaults
from lmforge.runtime import native_bf16, pick_device
from lmforge.stage import cli, write_meta
from lmforge.stats import mean_interval, paired_gain

LN2 = math.log(2)


def teacher_autocast(cfg: DistillConfig, device: torch.device):
    """bf16 for the teacher's forward pass where the hardware runs it natively; fp32 elsewhere."""
    bf16 = cfg.teacher_dtype == "bf16" or (cfg.teacher_dtype == "auto" and native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), bf16


class _ForwardKD(torch.autograd.Function):
    """kd_weight x t^2 x KL(teacher || student) at temperature t, plus (1 - kd_weight) x cross-entropy, with its
    gradient written out: (softmax(s/t) - p_teacher) x kd_weight x t + (softmax(s) - onehot) x (1 - kd_weight), per
    token. Autograd's version keeps and re-reads several vocabulary-wide tensors per token (log-softmax backward,
    the KL's product, the cross-entropy's own log-softmax): over a 49k vocabulary they cost about as much as the
    head's matmul and cross-entropy (docs/findings/speed/kd-loss.txt); this one adds less than half of that."""

    @staticmethod
    def forward(ctx, s, t_logits, targets, kd: float, t: float):
        rows = s.size(0)
        s_log_t = F.log_softmax(s if t == 1 else s / t, dim=-1)
        s_log = s_log_t if t == 1 else F.log_softmax(s, dim=-1)
        t_log = F.log_softmax(t_logits.float() if t == 1 else t_logits.float() / t, dim=-1)
        p_t = t_log.exp()
        kl = ((t_log - s_log_t) * p_t).sum() / rows  # "batchmean": summed over the vocabulary, averaged over tokens
        ce = -s_log.gather(1, targets[:, None]).sum() / rows
        ctx.save_for_backward(s_log_t, s_log, p_t, targets)
        ctx.kd, ctx.t = kd, t
        return kd * kl * t * t + (1 - kd) * ce, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        s_log_t, s_log, p_t, targets = ctx.saved_tensors
        kd, t, rows = ctx.kd, ctx.t, s_log_t.size(0)
        if t == 1:  # one softmax serves both terms: in place of the saved log-probabilities
            grad = s_log_t.exp_().sub_(p_t, alpha=kd)
        else:
            grad = (s_log_t.exp() - p_t).mul_(kd * t).add_(s_log.exp(), alpha=1 - kd)
        grad.scatter_add_(1, targets[:, None], torch.full_like(grad[:, :1], -(1 - kd)))
        return grad.mul_(grad_loss / rows), None, None, None, None


def distill_loss(student_logits, teacher_logits, targets, cfg: DistillConfig) -> tuple[torch.Tensor, float]:
    """(kd_weight x KL term + (1 - kd_weight) x cross-entropy, the cross-entropy alone)."""
    vocab = student_logits.size(-1)
    s, y = student_logits.reshape(-1, vocab), targets.reshape(-1)
    if cfg.kd_weight == 0:  # no teacher term: the control's loss, to the bit
        ce = F.cross_entropy(s, y)
        return ce, ce.item()
    if cfg.loss == "forward_kl":  # KL(teacher || student)
        loss, ce = _ForwardKD.apply(s, teacher_logits.reshape(-1, vocab).detach(), y, cfg.kd_weight, cfg.temperature)
        return loss, ce.item()
    t = cfg.temperature  # KL(student || teacher)
    s_log = F.log_softmax(s / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / t, dim=-1)
    kl = F.kl_div(t_log, s_log, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s, y)
    return cfg.kd_weight * kl * t * t + (1 - cfg.kd_weight) * ce, ce.item()


@torch.no_grad()
def heldout(models: dict, windows: dict[str, torch.Tensor], tokenizer, device, teacher_ctx) -> dict:
    """Per model and source: bits per byte of each held-out window and their mean (the figure the paired gain is
    the difference of), and the models' forward KL(teacher || model) at temperature 1. Special tokens (document
    ends) are neither counted in a window's bytes nor charged as targets: bits/byte of the text alone."""
    out: dict = {name: {} for name in models}
    for model in models.values():
        model.eval()  # training is over: nothing here trains again
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    for source, data in windows.items():
        targets = data[:, 1:].to(device)
        text = ~torch.isin(targets, special)
        nbytes = [len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True).encode("utf-8")) or 1 for w in data]
        logits = {}
        for name, model in models.items():
            with (teacher_ctx if name == "teacher" else torch.autocast(device.type, enabled=False)):
                logits[name] = model(input_ids=data[:, :-1].to(device)).logits.float()
            nats = (F.cross_entropy(logits[name].transpose(1, 2), targets, reduction="none") * text).sum(1)
            per_window = [float(n) / LN2 / b for n, b in zip(nats, nbytes)]
            out[name][source] = {"bits_per_byte": round(sum(per_window) / len(per_window), 4), "windows": per_window}
        for name in models:
            if name != "teacher" and "teacher" in logits:
                vocab = logits[name].size(-1)
                kl = F.kl_div(F.log_softmax(logits[name], -1).flatten(0, 1),
                              F.log_softmax(logits["teacher"][..., :vocab], -1).flatten(0, 1),
                              log_target=True, reduction="batchmean")
                out[name][source]["kl_to_teacher"] = round(float(kl), 4)
    return out


def student_tokenizer(tokenizer):
    """The teacher's tokenizer with a pad token and its chat template marked for lmforge (as the base stage does),
    so evaluate loads the student like any variant."""
    marked = chat.with_masks(tokenizer.chat_template) if tokenizer.chat_template else None
    if marked:
        tokenizer.chat_template = marked
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save(model, tokenizer, folder: Path) -> None:
    set_generation_defaults(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(cfg: DistillConfig, *, corpus: Path, out: Path, tracker) -> dict:
    """Train the student against the teacher and the control without it; measure both and the teacher."""
    out = Path(out)
    if not cfg.teacher:
        for name in ("model", "control"):
            (out / name).mkdir(parents=True)
            (out / name / NOT_WRITTEN).write_text("distill.teacher is empty: no distillation; drop distill from "
                                                  "evaluate.variants\n")
        (out / "curves.csv").write_text("step,student_ce\n")  # dvc.yaml declares it: present, with no steps
        return {"teacher_source": ""}
    sources = source_names(corpus, "val")
    if not sources:
        raise InputError(f"{corpus}: the val split has no sources (run the mix stage)")
    source = pretrained.resolve(cfg.teacher, cfg.allow_network, knob="distill.teacher")
    device = pick_device(cfg.device, "distill", cfg.num_threads)
    start = time.perf_counter()
    print(f"distill: loading the teacher {source.describe()}", file=sys.stderr)
    teacher, tokenizer = pretrained.load(source, cfg.allow_network, knob="distill.teacher")
    teacher = teacher.to(device).eval().requires_grad_(False)
    tokenizer = student_tokenizer(tokenizer)
    load_s = time.perf_counter() - start
    ctx, bf16 = teacher_autocast(cfg, device)

    train = tokenize_split(tokenizer, corpus, "train")
    if len(train) < cfg.seq_len + 2:
        raise InputError(f"{corpus}/train: {len(train)} tokens, too few for one window of distill.seq_len {cfg.seq_len}")
    val = {s: eval_windows(tokenize_split(tokenizer, corpus, "val", s), cfg.seq_len, cfg.eval_windows) for s in sources}
    student = build_model(cfg, tokenizer).to(device)
    models = {"student": student}
    if cfg.control:
        models["control"] = copy.deepcopy(student)  # the same initial weights
    opts = {name: torch.optim.AdamW(param_groups(m, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
            for name, m in models.items()}
    rng = np.random.default_rng(cfg.seed)
    rows, timing = [], {"teacher_s": 0.0, "student_s": 0.0, "control_s": 0.0}
    for step in tqdm(range(cfg.max_steps), desc="distill", unit="step", file=sys.stderr, mininterval=1.0):
        starts = rng.integers(0, len(train) - cfg.seq_len - 1, cfg.batch_size)
        batch = torch.from_numpy(np.stack([train[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        with torch.no_grad(), ctx:  # a teacher's head may be padded past its tokenizer: keep the real tokens
            teacher_logits = teacher(input_ids=inputs).logits[..., : student.config.vocab_size]
        timing["teacher_s"] += time.perf_counter() - t0
        row = {"step": step, "lr": lr_at(step, cfg)}
        for name, model in models.items():
            t0 = time.perf_counter()
            for group in opts[name].param_groups:
                group["lr"] = row["lr"]
            logits = model(input_ids=inputs).logits
            if name == "student":
                loss, ce = distill_loss(logits, teacher_logits, targets, cfg)
            else:
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
                ce = loss.detach().item()
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            row[f"{name}_loss"], row[f"{name}_ce"] = round(loss.detach().item(), 5), round(ce, 5)
            timing[f"{name}_s"] += time.perf_counter() - t0
        rows.append(row)
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

    measured = heldout({"teacher": teacher, **models}, val, tokenizer, device, ctx)
    metrics: dict = {"teacher_source": cfg.teacher, "teacher_params": sum(p.numel() for p in teacher.parameters()),
                     "student_params": sum(p.numel() for p in student.parameters()),
                     "tokens": cfg.max_steps * cfg.batch_size * cfg.seq_len, "teacher_bf16": bf16,
                     "teacher_load_s": round(load_s, 2), **{k: round(v, 2) for k, v in timing.items()}}
    for name, per_source in measured.items():
        metrics[name] = {s: {k: v for k, v in m.items() if k != "windows"} for s, m in per_source.items()}
    if cfg.control:  # lower bits/byte is better: the gain is control minus student, per window, paired
        metrics["gain_over_control"] = {
            s: paired_gain([-x for x in measured["control"][s]["windows"]], [-x for x in measured["student"][s]["windows"]])
            for s in sources}
    metrics["student_bits_per_byte"] = {s: mean_interval(measured["student"][s]["windows"]) for s in sources}
    metrics["bits_per_byte"] = {name: round(sum(m[s]["bits_per_byte"] for s in sources) / len(sources), 4)
                                for name, m in measured.items()}  # the sources' mean, for one-line summaries

    save(student, tokenizer, out / "model")
    write_meta(out / "model", "distill", cfg, metrics, {"corpus": corpus}, role="student")
    if cfg.control:
        save(models["control"], tokenizer, out / "control")
        write_meta(out / "control", "distill", cfg, metrics, {"corpus": corpus}, role="control")
    else:
        (out / "control").mkdir()
        (out / "control" / NOT_WRITTEN).write_text("distill.control is false: no control was trained\n")
    with (out / "curves.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tracker.log_artifact(out / "curves.csv")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("distill", run, inputs=("corpus",), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
