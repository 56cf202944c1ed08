"""Rows 1-3: training throughput of the stages against the same work done without the pipeline.

1. pretrain stage (`tasks.pretrain.run`) vs a hand-written PyTorch loop on the same model, batch and dtype;
2. the stage's FLOP/s vs the machine's matmul peak (MFU);
3. sft and ppo stages vs TRL's trainers called directly with the same settings.

Steady state only: the first steps (allocations, kernel selection, data-loader start) are excluded on
both sides, and each figure is the best of `sizes.repeats` alternating runs (other load only slows).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.core import Context, Row, log, ratio_row, stage_module
from bench.machine import matmul_peak


class Recorder:
    """A tracker that keeps, with a timestamp, every metric a stage logs."""

    run_id = None

    def __init__(self):
        self.records: list[tuple[float, int | None, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.records.append((time.perf_counter(), step, dict(metrics)))

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


def timing_callback():
    """A transformers callback that records (time, step, logs) like Recorder does for a stage."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.records: list[tuple[float, int | None, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.records.append((time.perf_counter(), state.global_step, dict(logs or {})))

    return Timing()


def steady_rate(records, counter: str, from_step: int) -> float:
    """Growth of a cumulative counter per second, from the first log at or after `from_step` to the last."""
    points = [(t, s, m[counter]) for t, s, m in records if s is not None and counter in m]
    points = [p for p in points if p[1] >= from_step]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        raise RuntimeError(f"too few logs of {counter!r} after step {from_step} to time ({len(points)})")
    (t0, _, c0), (t1, _, c1) = points[0], points[-1]
    return (c1 - c0) / (t1 - t0)


# ------------------------------------------------------------------------------------------ pretrain
def pretrain_config(ctx: Context):
    from lmforge.config import PretrainConfig

    s = ctx.sizes
    total = s.pretrain_warm + s.pretrain_steps
    return PretrainConfig.model_validate({**s.pretrain, "max_steps": total, "eval_every": total})


def run_pretrain_stage(ctx: Context, out: Path) -> float:
    """Steady tokens/s of the stage: the harmonic mean of its logged intervals after the warm-up (each
    interval holds the same number of tokens, so this is total tokens / total time)."""
    from tasks import pretrain

    cfg = pretrain_config(ctx)
    corpus, tok_dir = ctx.data()
    rec = Recorder()
    pretrain.run(cfg, corpus=corpus, tokenizer=tok_dir, out=out, tracker=rec)
    rates = [m["tokens_per_s"] for _, step, m in rec.records if "tokens_per_s" in m and step > ctx.sizes.pretrain_warm]
    if not rates:
        raise RuntimeError("the pretrain stage logged no throughput after the warm-up")
    return len(rates) / sum(1 / r for r in rates)


def run_pretrain_baseline(ctx: Context) -> dict:
    """The minimal loop: same model (build_model), batch, seq_len, dtype and AdamW; no schedule, logging
    or evaluation. Gradient clipping is kept when the config clips: it is part of the recipe, not overhead."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from lmforge import lm

    cfg = pretrain_config(ctx)
    corpus, tok_dir = ctx.data()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    device, amp_dtype = lm.resolve_device(cfg)
    data = torch.from_numpy(lm.tokenize_split(tok, corpus, "train").astype(np.int64))
    model = lm.build_model(cfg, tok).to(device)
    if cfg.compile:  # the same compiled model as the stage, or the comparison would be unfair
        model.compile()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.seq_len + 1)
    vocab = model.config.vocab_size

    def step():
        starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(ctx.sizes.pretrain_warm):
        step()
    step().item()  # one more, synchronised, so the clock starts on an idle device
    start = time.perf_counter()
    for _ in range(ctx.sizes.pretrain_steps):
        loss = step()
    loss.item()
    seconds = time.perf_counter() - start
    tokens = ctx.sizes.pretrain_steps * cfg.batch_size * cfg.seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "flops_per_token": lm.flops_per_token(model, cfg.seq_len),
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": device.type,
        "dtype": "bf16" if amp_dtype is not None else "fp32",
    }


def pretrain_measurement(ctx: Context) -> dict:
    """Stage and baseline, alternating `repeats` times; shared by rows 1 and 2 and the sft/ppo base model."""

    def measure():
        stage_runs, base_runs, info = [], [], {}
        for i in range(ctx.sizes.repeats):
            log(f"pretrain: stage run {i + 1}/{ctx.sizes.repeats}")
            stage_runs.append(run_pretrain_stage(ctx, ctx.workdir / f"pretrain-{i}"))
            log(f"pretrain: hand-written loop {i + 1}/{ctx.sizes.repeats}")
            info = run_pretrain_baseline(ctx)
            base_runs.append(info.pop("tokens_per_s"))
        return {"stage": max(stage_runs), "baseline": max(base_runs), "stage_runs": stage_runs,
                "baseline_runs": base_runs, "model_dir": ctx.workdir / "pretrain-0" / "model", **info}

    return ctx.memo("pretrain", measure)


def _shape_note(ctx: Context, m: dict) -> str:
    cfg = pretrain_config(ctx)
    return (f"{m['n_params'] / 1e6:.1f}M params, batch {cfg.batch_size}×{cfg.seq_len}, {m['dtype']} on {m['device']}; "
            f"{ctx.sizes.pretrain_steps} steps timed after {ctx.sizes.pretrain_warm}; best of {ctx.sizes.repeats}")


def pretrain_rows(ctx: Context) -> list[Row]:
    m = pretrain_measurement(ctx)
    return [ratio_row("1", "pretrain_throughput", "Pretraining throughput (pretrain stage)", m["stage"], m["baseline"],
                      "tokens/s", baseline_name="hand-written PyTorch loop", at_least=0.95, note=_shape_note(ctx, m),
                      stage_runs=m["stage_runs"], baseline_runs=m["baseline_runs"])]


def mfu_rows(ctx: Context) -> list[Row]:
    m = pretrain_measurement(ctx)
    log(f"matmul peak: n={ctx.sizes.matmul_n} on {ctx.device}")
    peak = ctx.memo("peak", lambda: matmul_peak(ctx.device, ctx.sizes.matmul_n, ctx.sizes.matmul_seconds))
    ours = m["stage"] * m["flops_per_token"] / 1e9
    base_mfu = m["baseline"] * m["flops_per_token"] / peak["flops_per_s"]
    note = f"{m['flops_per_token'] / 1e6:.1f} MFLOP/token (6N + attention); hand-written loop: {base_mfu:.1%} MFU"
    if ctx.device == "cpu":
        note += f"; peak with {peak['threads']} torch threads"
    row = ratio_row("2", "pretrain_mfu", "Pretraining FLOP/s vs matmul peak (MFU)", ours, peak["flops_per_s"] / 1e9,
                    "GFLOP/s", baseline_name=f"torch.matmul {peak['n']}² {peak['dtype']}",
                    at_least=0.40 if ctx.device == "cuda" else None, note=note, peak=peak)
    row.value_text = f"{row.value:.1%} MFU"
    return [row]


def base_model(ctx: Context) -> Path:
    """A pretrained model folder (with tokenizer) for the post-training rows: row 1's, or a short run."""
    if "pretrain" in ctx._cache:
        return ctx._cache["pretrain"]["model_dir"]

    def make():
        from tasks import pretrain
        from lmforge.tracking import NullTracker

        log("base model: a short pretrain run")
        corpus, tok_dir = ctx.data()
        cfg = pretrain_config(ctx).model_copy(update={"max_steps": 4, "eval_every": 4, "log_every": 2})
        out = ctx.workdir / "base"
        pretrain.run(cfg, corpus=corpus, tokenizer=tok_dir, out=out, tracker=NullTracker())
        return out / "model"

    return ctx.memo("base_model", make)


# ----------------------------------------------------------------------------------------------- sft
def sft_config(ctx: Context, stage: str = "sft"):
    """The stage's config at the bench's size, with replay as the presets have it."""
    from lmforge.config import LoraConfig, SftConfig

    s = ctx.sizes
    total = s.sft_warm + s.sft_steps
    return (LoraConfig if stage == "lora" else SftConfig).model_validate(
        {**s.sft, "max_steps": total, "warmup_steps": 1, "train_examples": s.sft["batch_size"] * total})


def trl_sft_direct(cfg, base: Path, corpus: Path, work: Path) -> list:
    """TRL's SFTTrainer on the same conversations, model and training settings, with its own (padded) batches and
    nothing else around it."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lmforge.training import finetune

    tok, convs, device = finetune.prepare(cfg, base, "sft", corpus)
    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(work), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_length=min(cfg.max_length, model.config.max_position_embeddings),
        assistant_only_loss=cfg.assistant_only_loss, logging_steps=cfg.log_every, save_strategy="no",
        report_to="none", seed=cfg.seed, bf16=cuda, use_cpu=not cuda, activation_checkpointing=False,
        dataloader_num_workers=0,
    )
    timer = timing_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=finetune.conversation_dataset(convs),
                         processing_class=tok, callbacks=[timer])
    trainer.train()
    return timer.records


def plain_loop(ctx: Context, cfg, base: Path, corpus: Path, work: Path, peft_config=None) -> float:
    """Tokens/s of the minimal loop on the stage's own model (with its adapters for LoRA) and packed batches:
    forward, backward, AdamW on the trainable parameters; no schedule, logging, metrics or checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.data import posttrain_data
    from lmforge.tracking import NullTracker
    from lmforge.training import finetune

    tok, convs, device = finetune.prepare(cfg, base, "sft", corpus)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = finetune.make_trainer(cfg, model, tok, convs, posttrain_data.conversations("test", 4, cfg.seed), work,
                                    device, NullTracker(), [], peft_config)  # for its model and batches only
    model = trainer.model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=device == "cuda")
    batches = iter(trainer.get_train_dataloader())

    def step() -> int:
        batch = next(batches)
        real = int(batch.pop(finetune.REAL_TOKENS))
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real

    for _ in range(ctx.sizes.sft_warm):
        step()
    start, tokens = time.perf_counter(), 0
    for _ in range(ctx.sizes.sft_steps):
        tokens += step()
    return tokens / (time.perf_counter() - start)


def sft_rows(ctx: Context) -> list[Row]:
    """3a sft stage vs TRL called directly; 3c sft and 3e lora stages vs the plain loop on the same batches;
    3d packed vs padded batches in the sft stage."""
    from lmforge.models import load_tokenizer

    sft, lora = stage_module("sft"), stage_module("lora")
    base, (corpus, _) = base_model(ctx), ctx.data()
    cfg, lora_cfg = sft_config(ctx), sft_config(ctx, "lora")
    padded = cfg.model_copy(update={"padding_free": False})
    adapters = lora.adapter_config(lora_cfg, load_tokenizer(base))
    warm, runs = ctx.sizes.sft_warm, {k: [] for k in ("stage", "padded", "trl", "loop", "lora", "lora_loop")}

    def stage_rate(module, c, name: str) -> float:
        rec = Recorder()
        module.run(c, base=base, corpus=corpus, out=_fresh(ctx, name), tracker=rec)
        return steady_rate(rec.records, "train/num_tokens", warm)

    for i in range(ctx.sizes.repeats):
        log(f"sft: stage, padded, TRL directly, plain loop; lora: stage, plain loop ({i + 1}/{ctx.sizes.repeats})")
        runs["stage"].append(stage_rate(sft, cfg, f"sft-{i}"))
        runs["padded"].append(stage_rate(sft, padded, f"sft-padded-{i}"))
        runs["trl"].append(steady_rate(trl_sft_direct(cfg, base, corpus, _fresh(ctx, f"sft-trl-{i}")), "num_tokens", warm))
        runs["loop"].append(plain_loop(ctx, cfg, base, corpus, _fresh(ctx, f"sft-loop-{i}")))
        runs["lora"].append(stage_rate(lora, lora_cfg, f"lora-{i}"))
        runs["lora_loop"].append(plain_loop(ctx, lora_cfg, base, corpus, _fresh(ctx, f"lora-loop-{i}"), adapters))
    best = {k: max(v) for k, v in runs.items()}
    note = (f"batch {cfg.batch_size} (replay share {cfg.replay_share}), {ctx.sizes.sft_steps} steps timed after {warm}; "
            f"tokens = conversation tokens, padding not counted; best of {ctx.sizes.repeats}")
    return [
        ratio_row("3a", "sft_throughput", "SFT throughput (sft stage)", best["stage"], best["trl"], "tokens/s",
                  baseline_name="TRL SFTTrainer called directly (its padded batches)", at_least=0.95,
                  note=note + "; the stage packs its batches (padding_free)", stage_runs=runs["stage"],
                  baseline_runs=runs["trl"]),
        ratio_row("3c", "sft_vs_loop", "SFT throughput vs a plain PyTorch loop (sft stage)", best["stage"],
                  best["loop"], "tokens/s", baseline_name="forward, backward, AdamW on the same model and batches",
                  at_least=0.95, note=note, stage_runs=runs["stage"], baseline_runs=runs["loop"]),
        ratio_row("3d", "sft_packing", "SFT throughput, packed vs padded batches (sft stage)", best["stage"],
                  best["padded"], "tokens/s", baseline_name="the same stage with padding_free: false", note=note,
                  stage_runs=runs["stage"], baseline_runs=runs["padded"]),
        ratio_row("3e", "lora_vs_loop", "LoRA throughput vs a plain PyTorch loop (lora stage)", best["lora"],
                  best["lora_loop"], "tokens/s", baseline_name="forward, backward, AdamW on the same adapters and batches",
                  at_least=0.95, note=note + f"; r {lora_cfg.r} on {len(lora_cfg.target_modules)} module kinds",
                  stage_runs=runs["lora"], baseline_runs=runs["lora_loop"]),
    ]


# ----------------------------------------------------------------------------------------------- ppo
def ppo_config(ctx: Context):
    from lmforge.config import PpoConfig

    s = ctx.sizes
    total = s.ppo_warm + s.ppo_steps
    return PpoConfig.model_validate({**s.ppo, "steps": total, "train_prompts": s.ppo["batch_size"] * total})


def ppo_queries(cfg, tok) -> list[list[int]]:
    from lmforge.data import posttrain_data

    rows = posttrain_data.prompts("train", cfg.train_prompts, cfg.seed)
    return [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for r in rows]


def trl_ppo_direct(cfg, policy_dir: Path, reward_dir: Path, work: Path) -> list:
    """TRL's PPOTrainer with the same models, prompts and PPO settings as the stage, nothing else around it."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from lmforge.chat import end_token

    set_seed(cfg.seed)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(policy_dir)
    queries = ppo_queries(cfg, tok)
    tok.padding_side = "left"
    tok.eos_token = end_token(tok)  # rollouts end their turn with <|end|>, as in the stage

    def scorer():
        m = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, pad_token_id=tok.pad_token_id)
        m.config.pad_token_id = tok.pad_token_id
        return m.to(device)

    policy = AutoModelForCausalLM.from_pretrained(policy_dir).to(device)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir).to(device).eval().requires_grad_(False)
    reward, value = scorer().eval().requires_grad_(False), scorer()
    args = PPOConfig(
        output_dir=str(work), seed=cfg.seed, report_to="none", save_strategy="no", use_cpu=not cuda, bf16=False,
        activation_checkpointing=False, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=cfg.mini_batches, total_episodes=cfg.steps * cfg.batch_size,
        local_rollout_forward_batch_size=cfg.batch_size, num_ppo_epochs=cfg.ppo_epochs, learning_rate=cfg.lr,
        lr_scheduler_type="linear", response_length=cfg.response_length, temperature=cfg.temperature,
        stop_token="eos", missing_eos_penalty=cfg.missing_end_penalty, kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
        vf_coef=cfg.vf_coef, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
        num_sample_generations=0,
    )
    timer = timing_callback()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": queries}), callbacks=[timer])
    trainer.train()
    return timer.records


def _episode_rate(records, warm: int) -> float:
    for key in ("episode", "rollout/episode", "trl/episode"):
        if any(key in m for _, _, m in records):
            return steady_rate(records, key, warm)
    raise RuntimeError("no 'episode' counter in the PPO logs")


def ppo_rows(ctx: Context) -> list[Row]:
    stage = stage_module("ppo")
    stage_module("ppo_backend")
    from transformers import AutoTokenizer

    base = base_model(ctx)  # policy and reward model alike: throughput does not depend on what they learnt
    cfg = ppo_config(ctx)
    warm = ctx.sizes.ppo_warm
    ours, theirs = [], []
    for i in range(ctx.sizes.repeats):
        log(f"ppo: stage run {i + 1}/{ctx.sizes.repeats}")
        rec = Recorder()
        stage.run(cfg, policy=base, reward_model=base, out=_fresh(ctx, f"ppo-{i}"), tracker=rec)
        ours.append(_episode_rate(rec.records, warm))
        log(f"ppo: TRL PPOTrainer directly {i + 1}/{ctx.sizes.repeats}")
        theirs.append(_episode_rate(trl_ppo_direct(cfg, base, base, _fresh(ctx, f"ppo-trl-{i}")), warm))
    queries = ppo_queries(cfg, AutoTokenizer.from_pretrained(base))
    per_episode = sum(map(len, queries)) / len(queries) + cfg.response_length
    note = (f"batch {cfg.batch_size} rollouts × {cfg.ppo_epochs} epochs, {ctx.sizes.ppo_steps} updates timed "
            f"after {warm}; "
            f"tokens/s = episodes/s × {per_episode:.1f} (mean query + response length); best of {ctx.sizes.repeats}")
    return [ratio_row("3b", "ppo_throughput", "PPO throughput (ppo stage)", max(ours) * per_episode,
                      max(theirs) * per_episode, "tokens/s", baseline_name="TRL PPOTrainer called directly",
                      at_least=0.95, note=note, stage_episodes_per_s=ours, baseline_episodes_per_s=theirs)]


def _fresh(ctx: Context, name: str) -> Path:
    path = ctx.workdir / name
    path.mkdir(parents=True, exist_ok=True)
    return path
