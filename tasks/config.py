"""Typed configuration: one pydantic model per stage, one section of params.yaml each.

The models are the single source of truth for knobs, defaults and their one-line descriptions:
`configs/default.yaml` and the comments in `params.yaml` are rendered from them (`python -m tasks.preset`).
Unknown keys and wrong types are errors that name the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STAGES = ("mix", "tokenizer", "pretrain", "sft", "lora", "reward", "ppo", "quantize", "evaluate")


class ConfigError(ValueError):
    """A params file that does not match the schema; the message names the key."""


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent cast; int is still accepted for float
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


def F(default: Any, description: str, **bounds: Any) -> Any:
    """A field with its one-line description (the params.yaml comment) and optional bounds (ge, gt, le, lt)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=description, **bounds)
    return Field(default, description=description, **bounds)


# ----------------------------------------------------------------------------------------------- mix
class SourceConfig(_Section):
    name: str = F("", "unique name, used in stats and per-source metrics")
    kind: Literal["pydoc", "stdlib", "arithmetic", "files", "hf"] = F("files", "where the text comes from")
    weight: float = F(1.0, "mixture weight: share of the character budget this source gets")
    path: str | None = F(None, "files: a file, directory or glob of .txt/.jsonl/.parquet")
    text_field: str = F("text", "files/hf: the column that holds the text")
    dataset: str | None = F(None, "hf: dataset name on the hub (needs mix.allow_network)")
    split: str = F("train", "hf: split to read")
    max_docs: int | None = F(None, "read at most this many documents from the source")


class MixConfig(_Section):
    seed: int = F(0, "seed for shuffling, sampling and the validation split")
    sources: list[SourceConfig] = F(
        [
            {"name": "pydoc", "kind": "pydoc", "weight": 0.35},
            {"name": "stdlib", "kind": "stdlib", "weight": 0.35},
            {"name": "arithmetic", "kind": "arithmetic", "weight": 0.30},
        ],
        "corpora to mix; built-in kinds need no download",
    )
    budget_chars: int = F(4_000_000, "size budget: characters in the training split, shared by weight")
    val_fraction: float = F(0.05, "share of each source's documents held out for validation", gt=0, lt=1)
    max_doc_chars: int = F(4000, "longer documents are cut into pieces of at most this many characters")
    min_doc_chars: int = F(100, "quality filter: drop documents shorter than this")
    max_symbol_ratio: float = F(0.5, "quality filter: drop documents where non-alphanumeric, non-space chars exceed this share")
    max_dup_line_ratio: float = F(0.5, "quality filter: drop documents whose lines repeat more than this share")
    near_dedup: bool = F(True, "remove near-duplicates with MinHash LSH")
    minhash_perms: int = F(64, "MinHash permutations (signature length)")
    minhash_bands: int = F(16, "LSH bands; rows per band = perms / bands")
    shingle_size: int = F(5, "word n-gram size for MinHash shingles")
    near_dup_threshold: float = F(0.8, "estimated Jaccard similarity above which a document is a near-duplicate")
    arithmetic_docs: int = F(20000, "documents the arithmetic source generates")
    arithmetic_max_operand: int = F(99, "largest operand in generated arithmetic")
    shard_docs: int = F(2000, "documents per output shard")
    allow_network: bool = F(False, "let hf sources download; off keeps the default path offline")


# ----------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(_Section):
    kind: Literal["bpe", "wordpiece", "unigram"] = F("bpe", "model: byte-level BPE, WordPiece or Unigram")
    vocab_size: int = F(4096, "vocabulary size, special tokens included", gt=0)
    min_frequency: int = F(2, "BPE/WordPiece: ignore merges seen fewer times")
    split_digits: bool = F(True, "split numbers into single digits (helps arithmetic)")
    special_tokens: list[str] = F(
        ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "special tokens: eos, pad, then the chat roles and end-of-turn",
    )
    max_train_chars: int = F(20_000_000, "train on at most this many characters of the training split")


# ------------------------------------------------------------------------------------------ pretrain
class PretrainConfig(_Section):
    seed: int = F(0, "seed for initialisation and batch order")
    hidden_size: int = F(256, "model width")
    num_layers: int = F(4, "decoder layers")
    num_heads: int = F(4, "attention heads")
    num_kv_heads: int = F(4, "key/value heads (fewer than num_heads = grouped-query attention)")
    intermediate_size: int = F(688, "MLP width (SwiGLU)")
    seq_len: int = F(256, "tokens per packed training sequence (also the context length)")
    rope_theta: float = F(10000.0, "RoPE base frequency")
    tie_embeddings: bool = F(True, "share input embedding and output head weights")
    batch_size: int = F(16, "sequences per micro-batch")
    grad_accum: int = F(1, "micro-batches per optimizer step")
    max_steps: int = F(600, "optimizer steps")
    lr: float = F(3e-3, "peak learning rate")
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = F(50, "linear warm-up steps")
    weight_decay: float = F(0.1, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.95, "AdamW beta2")
    grad_clip: float = F(1.0, "clip the global gradient norm to this; 0 disables")
    eval_every: int = F(100, "steps between held-out evaluations")
    eval_batches: int = F(8, "batches per held-out evaluation, per source")
    log_every: int = F(10, "steps between logged training metrics")
    checkpoint_every: int = F(200, "steps between checkpoints (resume picks up the last one)")
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available")
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "auto: bf16 autocast on cuda, fp32 on cpu")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default")
    sample_prompts: list[str] = F(["def ", "The ", "12 + 7 ="], "prompts for the sample generations saved with the model")
    sample_tokens: int = F(40, "tokens generated per sample prompt")


# ----------------------------------------------------------------------------- post-training stages
class SftConfig(_Section):
    seed: int = F(0, "seed for data generation and training")


class LoraConfig(_Section):
    seed: int = F(0, "seed for data generation and training")


class RewardConfig(_Section):
    seed: int = F(0, "seed for data generation and training")


class PpoConfig(_Section):
    seed: int = F(0, "seed for data generation and training")


class QuantizeConfig(_Section):
    seed: int = F(0, "seed")


class EvaluateConfig(_Section):
    seed: int = F(0, "seed")


SECTIONS: dict[str, type[_Section]] = {
    "mix": MixConfig,
    "tokenizer": TokenizerConfig,
    "pretrain": PretrainConfig,
    "sft": SftConfig,
    "lora": LoraConfig,
    "reward": RewardConfig,
    "ppo": PpoConfig,
    "quantize": QuantizeConfig,
    "evaluate": EvaluateConfig,
}
assert tuple(SECTIONS) == STAGES


# ------------------------------------------------------------------------------------------- loading
def _describe(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_section(stage: str, raw: Any, source: str = "params") -> _Section:
    """Validate one section's mapping into its typed config; raise ConfigError naming the key."""
    if stage not in SECTIONS:
        raise ConfigError(f"{source}: unknown stage section {stage!r} (stages: {', '.join(STAGES)})")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {stage!r} must be a mapping, got {type(raw).__name__}")
    try:
        return SECTIONS[stage].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err, stage)}") from None


def read_yaml(path: str | Path) -> dict:
    """YAML 1.2 (as DVC writes it), so `3e-4` is a float, not a string."""
    from ruamel.yaml import YAML

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    data = YAML(typ="safe", pure=True).load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, _Section]:
    """Every section of a params file, validated. Unknown sections are an error too."""
    data = read_yaml(path)
    unknown = sorted(set(data) - set(STAGES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    return {stage: parse_section(stage, data.get(stage), str(path)) for stage in STAGES}


def load_stage(stage: str, path: str | Path = "params.yaml") -> _Section:
    return parse_section(stage, read_yaml(path).get(stage), str(path))
