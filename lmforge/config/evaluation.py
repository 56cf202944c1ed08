"""The sections of the stages after training: quantize (low-bit variants of the chosen policy) and evaluate
(benchmarks over every model, and the quality gate)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from lmforge.config.base import Device, F, Section


class QuantizeConfig(Section):
    model: Literal["best", "sft", "lora", "ppo", "dpo", "grpo"] = F(
        "best", "policy to quantise and hand on: best = highest held-out exact match among the policy stages' own "
        "measurements (the same items for each; ties go to the earlier stage), or a stage's name"
    )
    methods: list[Literal["int8", "nf4", "rtn", "gptq", "qat"]] = F(
        ["int8", "nf4", "rtn", "gptq", "qat"],
        "variants to write: int8 = LLM.int8(), nf4 = 4-bit NormalFloat (bitsandbytes, no data); rtn = int4 "
        "round-to-nearest, gptq = int4 GPTQ calibrated on train windows, qat = int4 after quantisation-aware "
        "training (llmcompressor/torchao, compressed-tensors folders; rtn is their no-data baseline)")
    double_quant: bool = F(True, "nf4: quantise the per-block scales too (double quantisation, ~0.4 bit/param less)")
    compute_dtype: Literal["fp32", "bf16", "fp16"] = F("fp32", "nf4: dtype the dequantised weights are multiplied in")
    int8_threshold: float = F(6.0, "int8: activation outlier threshold kept in fp16 (LLM.int8 decomposition); 0 = pure int8", ge=0)
    skip_modules: list[str] = F(["lm_head"], "modules kept in full precision (embeddings are never quantised)")
    nf4_unpackable: Literal["keep", "quantize"] = F(
        "keep", "nf4: layers whose shape bitsandbytes' AVX512-BF16 CPU kernel cannot take (in_features % 64 or "
        "out_features % 32 not 0): keep = full precision, the folder runs on any machine with plain transformers; "
        "quantize = 4-bit anyway (GPUs, other CPUs, and lmforge's own loaders everywhere)"
    )
    int4_group_size: int = F(64, "rtn/gptq/qat: weight columns sharing one scale (nf4's block is 64 too)", gt=0)
    window_tokens: int = F(128, "gptq/qat: tokens per calibration or training window (capped at the model's context)", gt=1)
    gptq_windows: int = F(64, "gptq: calibration windows from the mix's train split (held-out text stays unseen)", gt=0)
    gptq_dampening: float = F(0.01, "gptq: share of the Hessian's mean diagonal added to it", ge=0)
    qat_steps: int = F(25, "qat: optimiser steps of fake-quantised training towards the full-precision outputs (on the default model 25 leave the held-out perplexity where 100 did, in 0.3 of the time: docs/findings/speed.md)", gt=0)
    qat_batch_size: int = F(8, "qat: windows per step (train split)", gt=0)
    qat_lr: float = F(1e-4, "qat: peak learning rate (AdamW, warm-up then cosine)", gt=0)
    qat_seed: int = F(0, "qat: seed for window order")
    ppl_tokens: int = F(8192, "held-out tokens (val split, equal share per source) for perplexity; the same for every variant", gt=0)
    batch_size: int = F(8, "sequences per forward pass when measuring perplexity", gt=0)
    gen_prompt: str = F("The ", "fixed prompt for the generation-speed measurement")
    gen_tokens: int = F(64, "new tokens per timed greedy generation", gt=0)
    gen_repeats: int = F(3, "timed generations per variant; the fastest counts (shared machines are noisy)", gt=0)
    device: Device = F("auto", "where variants are measured; auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)


class EvaluateConfig(Section):
    seed: int = F(0, "seed for sampling the benchmark items")
    variants: list[Literal["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4", "rtn", "gptq", "qat", "distill"]] = F(
        ["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4", "rtn", "gptq", "qat", "distill"], "models to compare; only these need to exist (dvc.yaml passes each as --<variant> DIR)"
    )
    tasks: list[Literal["arith_mc", "arith_gen", "cloze", "heldout_ppl"]] = F(
        ["arith_mc", "arith_gen", "cloze", "heldout_ppl"], "built-in lm-eval benchmarks over local held-out data"
    )
    mc_questions: int = F(100, "arith_mc: held-out arithmetic questions, scored by loglikelihood over the options", gt=0)
    mc_choices: int = F(4, "arith_mc: options per question (the answer and near misses)", ge=2, le=10)
    gen_questions: int = F(100, "arith_gen: held-out chat questions answered greedily, scored by exact match", gt=0)
    max_gen_tokens: int = F(8, "arith_gen: most new tokens per answer", gt=0)
    cloze_items: int = F(100, "cloze: held-out sentences whose last word is chosen among cloze_choices (LAMBADA-style)", gt=0)
    cloze_source: str = F("pydoc", "cloze: corpus source (val split) the sentences come from")
    cloze_context_chars: int = F(400, "cloze: characters of preceding text given as context", gt=0)
    cloze_choices: int = F(4, "cloze: options per sentence (the word and frequency-drawn distractors); chance = 1/this", ge=2)
    ppl_docs: int = F(10, "heldout_ppl: val documents per source for rolling perplexity", gt=0)
    ppl_max_chars: int = F(2000, "heldout_ppl: documents are cut to this many characters", gt=0)
    forgetting_limit: float = F(
        1.5, "a variant whose held-out bits/byte on any source exceeds this multiple of base's is flagged as "
        "forgetting (table, report card)", gt=1)
    batch_size: int = F(32, "lm-eval batch size", gt=0)
    log_samples: bool = F(True, "keep every example's prompt, output and score in lm_eval/<variant>.json")
    extra_tasks: list[str] = F([], "more lm-eval tasks by name or YAML path (e.g. hellaswag); skipped with a warning if their data is unavailable")
    extra_limit: int = F(100, "examples per extra task", gt=0)
    allow_network: bool = F(False, "let extra tasks download datasets; off: HF offline mode, only locally cached data")
    extra_timeout_s: float = F(120.0, "give up on an extra task whose data takes longer than this to load", gt=0)
    gate_metric: str = F("arith_gen.exact_match", "quality gate: table column (<task>.<metric>) compared with base")
    gate_variant: Literal["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4", "rtn", "gptq", "qat", "distill"] = F(
        "grpo", "quality gate: variant that must beat base"
    )
    min_gain_over_base: float | None = F(
        None, "quality gate: fail unless gate_variant's gate_metric >= base's + this (null: no gate)"
    )
    device: Device = F("auto", "auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if not self.variants:
            raise ValueError("variants: name at least one model to evaluate")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: duplicates in {self.variants}")
        if self.min_gain_over_base is not None:
            missing = [v for v in ("base", self.gate_variant) if v not in self.variants]
            if missing:
                raise ValueError(f"quality gate needs {' and '.join(missing)} in variants")
            if "." not in self.gate_metric:
                raise ValueError(f"gate_metric {self.gate_metric!r} must be <task>.<metric>, e.g. arith_gen.exact_match")
            task = self.gate_metric.split(".")[0]
            needed = "heldout_ppl" if task.startswith("ppl_") else task
            if needed in ("arith_mc", "arith_gen", "cloze", "heldout_ppl") and needed not in self.tasks:
                raise ValueError(f"gate_metric {self.gate_metric!r} needs {needed} in tasks")
        return self


class ExportConfig(Section):
    model: Literal["best", "sft", "lora", "ppo", "dpo", "grpo"] = F(
        "best", "policy to export: best = the one the quantize stage chose (the one the registry promotes), or a stage's name")
    types: list[Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]] = F(
        ["f16", "q8_0"], "GGUF files to write, one per type (q types quantise each weight matrix whose rows divide into "
        "blocks of 32; norms stay f32)", min_length=1)
    tokenizer_pre: str = F(
        "auto", "llama.cpp's name for the tokenizer's pre-tokenisation (tokenizer.ggml.pre); auto recognises "
        "lmforge's BPE, GPT-2's and SmolLM2's and refuses any other shape")
    license: str = F("other", "license in the model card's metadata (the base model's, where there is one)")
    verify_conversations: int = F(
        8, "held-out conversations on which each GGUF file, read back, is compared with the safetensors model "
        "(largest logit difference, same next token); 0 skips the check", ge=0)
    seed: int = F(0, "seed for the held-out conversations")


class ServeConfig(Section):
    """Not a stage: `make serve-model` and `make chat` (lmforge/serving.py); flags override each knob."""

    model: str = F("models:/lmforge@champion", "what to serve: a registry URI (the embedded store, or MLFLOW_TRACKING_URI's) or a model folder")
    host: str = F("127.0.0.1", "address to listen on (loopback: this machine only; 0.0.0.0 exposes it)")
    port: int = F(8000, "port of the OpenAI-compatible API", gt=0, lt=65536)
    device: Device = F("auto", "auto picks cuda when available")
    max_tokens: int = F(256, "new tokens per reply when a request does not say (never past the model's context)", gt=0)
