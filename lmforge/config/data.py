"""The data stages' sections: mix (sources, size budget, quality filters, near-dedup) and tokenizer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from lmforge.config.base import F, Section


# ----------------------------------------------------------------------------------------------- mix
class SourceConfig(Section):
    name: str = F("", "unique name (default: the kind), used in shard names, stats and metrics", pattern=r"^[A-Za-z0-9_.-]*$")
    kind: Literal["pydoc", "stdlib", "arithmetic", "files", "hf"] = F("files", "where the text comes from")
    weight: float = F(1.0, "mixture weight: share of the character budget this source gets", gt=0)
    path: str | None = F(None, "files: a file, directory or glob of .txt/.jsonl/.parquet (.txt: one document per file)")
    text_field: str = F("text", "files (jsonl/parquet) and hf: the field that holds the text")
    dataset: str | None = F(None, "hf: dataset name on the hub (needs mix.allow_network)")
    split: str = F("train", "hf: split to read")
    max_docs: int | None = F(None, "read at most this many documents from the source", gt=0)

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name"):
            data = {**data, "name": data.get("kind", "files")}
        return data

    @model_validator(mode="after")
    def _kind_needs(self) -> "SourceConfig":
        if self.kind == "files" and not self.path:
            raise ValueError(f"source {self.name!r} is kind files: set its path")
        if self.kind == "hf" and not self.dataset:
            raise ValueError(f"source {self.name!r} is kind hf: set its dataset")
        return self


class MixConfig(Section):
    seed: int = F(0, "seed for reading order, sampling, generated text and the validation split")
    sources: list[SourceConfig] = F(
        [
            {"name": "pydoc", "kind": "pydoc", "weight": 0.2},
            {"name": "stdlib", "kind": "stdlib", "weight": 0.2},
            {"name": "arithmetic", "kind": "arithmetic", "weight": 0.6},
        ],
        "corpora to mix; built-in kinds need no download",
    )
    budget_chars: int = F(4_000_000, "size budget: characters in the training split, shared by weight", gt=0)
    read_factor: float = F(2.0, "read at most this multiple of a source's target before filtering (keeps big sources fast)", ge=1)
    val_fraction: float = F(0.05, "share of each source's documents held out for validation", gt=0, lt=1)
    max_doc_chars: int = F(4000, "longer documents are cut into pieces of at most this many characters", ge=100)
    min_doc_chars: int = F(100, "quality filter: drop documents shorter than this", ge=0)
    max_symbol_ratio: float = F(0.5, "quality filter: drop documents where non-alphanumeric, non-space chars exceed this share", ge=0, le=1)
    max_dup_line_ratio: float = F(0.5, "quality filter: drop documents whose lines repeat more than this share", ge=0, le=1)
    near_dedup: bool = F(True, "remove near-duplicates with MinHash LSH")
    minhash_perms: int = F(64, "MinHash permutations (signature length)", gt=0)
    minhash_bands: int = F(16, "LSH bands; rows per band = perms / bands", gt=0)
    shingle_size: int = F(5, "word n-gram size for MinHash shingles", gt=0)
    near_dup_threshold: float = F(0.8, "estimated Jaccard similarity above which a document is a near-duplicate", gt=0, le=1)
    arithmetic_docs: int = F(20000, "documents the arithmetic source generates", ge=0)
    arithmetic_max_operand: int = F(99, "largest operand in generated arithmetic", ge=2)
    arithmetic_qa_share: float = F(0.8, "share of arithmetic lines that are post-training task questions (add, sub, mul, larger, repeat) in their exact wording, with the answer", ge=0, le=1)
    shard_docs: int = F(2000, "documents per output shard", gt=0)
    allow_network: bool = F(False, "let hf sources download; off keeps the default path offline")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        if not sources:
            raise ValueError("list at least one source")
        names = [s.name for s in sources]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate source name(s) {', '.join(dups)}: give each source a unique name")
        return sources

    @model_validator(mode="after")
    def _consistent(self) -> "MixConfig":
        if self.minhash_perms % self.minhash_bands:
            raise ValueError(f"minhash_perms ({self.minhash_perms}) must be a multiple of minhash_bands ({self.minhash_bands})")
        hf = [s.name for s in self.sources if s.kind == "hf"]
        if hf and not self.allow_network:
            raise ValueError(f"source(s) {', '.join(hf)} download from the Hugging Face hub: set mix.allow_network: true")
        return self


# ----------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(Section):
    kind: Literal["bpe", "wordpiece", "unigram"] = F(
        "bpe", "model: byte-level BPE (nothing unknown), WordPiece or Unigram (trains ~20x slower than bpe)"
    )
    vocab_size: int = F(4096, "vocabulary size, special tokens included (bpe needs >= 256 + specials)", gt=0)
    bpe_trainer: Literal["rustbpe", "hf"] = F(
        "rustbpe", "bpe: who learns the merges: rustbpe (2x faster here) or tokenizers' trainer; same tokenizer.json"
    )
    min_frequency: int = F(2, "hf trainer (bpe) and WordPiece: ignore merges seen fewer times", ge=1)
    split_digits: bool = F(True, "split numbers into single digits (helps arithmetic)")
    pre_tokenizer: Literal["gpt2", "gpt2_eol", "gpt4"] = F(
        "gpt2", "bpe: where merges may not cross: GPT-2's regex, gpt2_eol (line ends join the punctuation "
        "before them, +3.5% bytes/token), or GPT-4's (+4%, longer pieces)"
    )
    special_tokens: list[str] = F(
        ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "special tokens: eos first, and all of lmforge/chat.py's tokens; more may follow",
    )
    unk_token: str = F("<|unk|>", "WordPiece/Unigram: token for characters unseen in training (added to the specials)", min_length=1)
    max_train_chars: int = F(20_000_000, "train on at most this many characters of the training split", ge=1)

    @field_validator("special_tokens")
    @classmethod
    def _has_chat_tokens(cls, tokens: list[str]) -> list[str]:
        # every later stage relies on these (eos/pad ids, chat template): refuse rather than silently add them
        from lmforge import chat

        if not tokens or tokens[0] != chat.EOS:
            raise ValueError(f"the first special token must be the eos {chat.EOS!r}")
        missing = [t for t in chat.SPECIAL_TOKENS[1:] if t not in tokens]
        if missing:
            raise ValueError(f"missing lmforge chat token(s) {missing} (see lmforge/chat.py)")
        if len(set(tokens)) != len(tokens) or not all(tokens):
            raise ValueError("special tokens must be distinct and non-empty")
        return tokens
