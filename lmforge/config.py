"""Typed configuration: one pydantic model per stage, one section of params.yaml each.

The models are the single source of truth for knobs, defaults and their one-line descriptions:
`configs/default.yaml` and the comments in `params.yaml` are rendered from them (`python -m lmforge.cli.preset`).
Unknown keys and wrong types are errors that name the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.errors import ConfigError

STAGES = ("mix", "tokenizer", "pretrain", "sft", "lora", "reward", "ppo", "dpo", "grpo", "quantize", "evaluate")
SHARED = ("launch",)  # sections that are not stages: read by several stages, tracked by none (see LaunchConfig)
SECTION_NAMES = STAGES + SHARED
TRAINING_STAGES = ("pretrain", "sft", "lora", "reward", "ppo", "dpo", "grpo")
POLICIES = ("sft", "lora", "ppo", "dpo", "grpo")  # stages whose out/<name>/model is a chat policy


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent cast; int is still accepted for float
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


def F(default: Any, description: str, **bounds: Any) -> Any:
    """A field with its one-line description (the params.yaml comment) and optional bounds (ge, gt, le, lt)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=description, **bounds)
    return Field(default, description=description, **bounds)


# ----------------------------------------------------------------------------------------------- mix
from pydantic import field_validator, model_validator  # noqa: E402  (mix's cross-field checks)


class SourceConfig(_Section):
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


class MixConfig(_Section):
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
class TokenizerConfig(_Section):
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


# ------------------------------------------------------------------------------------------ pretrain
class PretrainConfig(_Section):
    seed: int = F(0, "seed for initialisation and batch order")
    init_from: str = F(
        "", "continue from this causal LM (local folder or hub id) with its own tokenizer, instead of random init; "
        "the size knobs below are then ignored"
    )
    allow_network: bool = F(False, "let init_from download from the Hugging Face hub; off: local folders and cache only")
    allow_pickle: bool = F(False, "let init_from load pickle weights (.bin, .pt), which can run code when loaded; off: safetensors only")
    trust_remote_code: bool = F(False, "let init_from run the Python code its config names (auto_map); off: such a model is refused")
    hidden_size: int = F(256, "model width", gt=0)
    num_layers: int = F(4, "decoder layers", gt=0)
    num_heads: int = F(4, "attention heads", gt=0)
    num_kv_heads: int = F(4, "key/value heads (fewer than num_heads = grouped-query attention)", gt=0)
    intermediate_size: int = F(704, "MLP width (SwiGLU); multiples of 64 let every layer take 4-bit CPU kernels", gt=0)
    seq_len: int = F(128, "tokens per packed training sequence (also the context length)", gt=0)
    rope_theta: float = F(10000.0, "RoPE base frequency", gt=0)
    tie_embeddings: bool = F(True, "share input embedding and output head weights")
    batch_size: int = F(8, "sequences per micro-batch (8 x 440 steps: the tokens of 16 x 220, twice the updates)", gt=0)
    grad_accum: int = F(1, "micro-batches per optimizer step", gt=0)
    max_steps: int = F(440, "optimizer steps", gt=0)
    lr: float = F(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = F(40, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.1, "AdamW weight decay (not applied to norms and biases)", ge=0)
    beta1: float = F(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = F(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = F(1.0, "clip the global gradient norm to this; 0 disables", ge=0)
    eval_every: int = F(50, "steps between held-out evaluations", gt=0)
    eval_batches: int = F(2, "batches per held-out evaluation, per source", gt=0)
    log_every: int = F(10, "steps between logged training metrics", gt=0)
    checkpoint_every: int = F(100, "steps between checkpoints (resume picks up the last one)", gt=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available")
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "auto: bf16 autocast on cuda, fp32 on cpu")
    compile: bool = F(False, "torch.compile the model in place (a GPU speed-up; the first steps pay for compiling)")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)
    sample_prompts: list[str] = F(["def ", "The ", "12 + 7 ="], "prompts for the sample generations saved with the model")
    sample_tokens: int = F(40, "tokens generated per sample prompt", ge=0)

    @model_validator(mode="after")
    def _shape(self) -> "PretrainConfig":
        # checked here, not when the model is built: the stage fails before it reads any data
        if not self.init_from and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if not self.init_from and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


# ----------------------------------------------------------------------------- post-training stages
class SftConfig(_Section):
    seed: int = F(0, "seed for data generation, batch order and initialisation")
    train_examples: int = F(8000, "built-in task conversations to train on (0: only data_files)", ge=0)
    test_examples: int = F(200, "held-out built-in conversations for loss and answer accuracy", gt=0)
    data_files: list[str] = F([], "extra JSONL training files in TRL messages or prompt_completion format")
    data_format: Literal["auto", "messages", "prompt_completion"] = F("auto", "format of data_files; auto detects it per file")
    max_steps: int = F(500, "optimizer steps (500 x 64: at 250 the copy task was learnt on one CPU and not on another; bench/results/experiment-teaching-default.md)", gt=0)
    batch_size: int = F(64, "conversations per micro-batch (64 at 3e-3 learns the tasks; a step costs ~1.9x one of 32)", gt=0)
    grad_accum: int = F(1, "micro-batches per optimizer step", gt=0)
    lr: float = F(3e-3, "peak learning rate (3e-3 learns the tasks; 1e-3 only their answer formats)", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = F("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = F(20, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    max_length: int = F(256, "truncate training conversations to this many tokens", gt=0)
    assistant_only_loss: bool = F(True, "loss on assistant tokens only (prompt tokens get label -100)")
    log_every: int = F(10, "steps between logged training metrics", gt=0)
    eval_every: int = F(0, "steps between held-out loss evaluations; 0: only before and after training", ge=0)
    checkpoint_every: int = F(100, "steps between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)
    eval_batch_size: int = F(64, "prompts per batched greedy generation when measuring accuracy", gt=0)
    max_new_tokens: int = F(8, "tokens generated per answer when measuring accuracy", gt=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)


class LoraConfig(SftConfig):
    """The sft knobs plus the adapter's; LoRA trains few parameters, so it takes a higher learning rate."""

    lr: float = F(3e-3, "peak learning rate", gt=0)
    max_steps: int = F(150, "optimizer steps (fewer than sft: a LoRA step costs about 1.3 full-SFT steps here)", gt=0)
    r: int = F(64, "LoRA rank (16 plateaued at twice full SFT's held-out loss)", gt=0)
    alpha: int = F(128, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = F(0.0, "dropout on the LoRA branch", ge=0, lt=1)
    target_modules: list[str] = F(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "linear layers that get adapters"
    )
    train_chat_tokens: bool = F(True, "also train the embedding rows of the chat special tokens, unseen in pretraining")
    qlora: bool = F(False, "QLoRA: freeze the base in 4-bit NF4 via bitsandbytes (CUDA; CPU works too, slower)")


class RewardConfig(_Section):
    seed: int = F(0, "seed for data generation, the new score head and batch order")
    train_pairs: int = F(3000, "built-in preference pairs to train on (posttrain_data, train split)", ge=0)
    test_pairs: int = F(400, "held-out built-in pairs for pairwise accuracy and margin (test split)", ge=1)
    gt_prompts: int = F(400, "held-out prompts for agreement with the ground-truth rule (correct vs wrong answer)", ge=1)
    data_files: list[str] = F([], "extra preference JSONL files (prompt/chosen/rejected as text or chat messages)")
    epochs: float = F(1.0, "passes over the training pairs", gt=0)
    batch_size: int = F(32, "preference pairs per optimizer step", ge=1)
    lr: float = F(3e-4, "peak learning rate (linear warm-up, then linear decay)", gt=0)
    warmup_ratio: float = F(0.05, "share of the steps spent warming up", ge=0, lt=1)
    weight_decay: float = F(0.0, "AdamW weight decay")
    center_rewards: float = F(0.01, "pull rewards toward mean zero (keeps PPO's reward scale sane); 0 disables", ge=0)
    max_length: int = F(128, "drop pairs whose chosen or rejected conversation is longer than this (tokens)", ge=8)
    eval_every: int = F(50, "optimizer steps between held-out accuracy evaluations", ge=1)
    log_every: int = F(5, "optimizer steps between logged training metrics", ge=1)
    checkpoint_every: int = F(25, "steps between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default")


class PpoConfig(_Section):
    seed: int = F(0, "seed for prompts, rollouts and batch order")
    policy: Literal["sft", "lora"] = F("sft", "model to start from: dvc.yaml passes out/<policy>/model as --policy")
    train_prompts: int = F(2000, "built-in training prompts (posttrain_data, train split)", ge=0)
    test_prompts: int = F(200, "held-out prompts for the before/after evaluation (test split)", ge=1)
    data_files: list[str] = F([], "extra training prompt JSONL files (TRL prompt-only format)")
    steps: int = F(25, "PPO updates: each samples batch_size rollouts, then trains ppo_epochs passes on them", ge=1)
    batch_size: int = F(32, "rollouts per update", ge=2)
    mini_batches: int = F(2, "minibatches each batch is split into per PPO epoch (must divide batch_size)", ge=1)
    ppo_epochs: int = F(2, "optimisation passes over each batch of rollouts", ge=1)
    response_length: int = F(8, "most new tokens per rollout (answers are short numbers)", ge=1)
    temperature: float = F(0.7, "sampling temperature of the rollouts", gt=0)
    lr: float = F(5e-5, "learning rate of policy and value model (linear decay)", gt=0)
    kl_coef: float = F(0.05, "weight of the per-token KL penalty to the frozen initial policy", ge=0)
    kl_estimator: Literal["k1", "k3"] = F("k1", "KL estimator in the penalty: k1 = log-ratio, k3 = lower variance")
    cliprange: float = F(0.2, "PPO ratio clip range", gt=0)
    cliprange_value: float = F(0.2, "value prediction clip range", gt=0)
    vf_coef: float = F(0.1, "weight of the value loss", ge=0)
    gamma: float = F(1.0, "discount factor", ge=0, le=1)
    lam: float = F(0.95, "GAE lambda", ge=0, le=1)
    whiten_rewards: bool = F(False, "whiten rewards per batch (needs minibatches of 8 or more)")
    missing_end_penalty: float | None = F(1.0, "subtracted from the score of a rollout that never ends its turn; null: none", ge=0)
    min_reward_accuracy: float | None = F(
        None, "quality gate: refuse to start if the reward model's held-out pairwise accuracy is below this", ge=0, le=1
    )
    eval_temperature: float = F(0.0, "before/after evaluation: 0 = greedy, > 0 samples with the stage seed", ge=0)
    eval_batch_size: int = F(64, "prompts per batch in the before/after evaluation", ge=1)
    checkpoint_every: int = F(5, "updates between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default")

    @model_validator(mode="after")
    def _divisible(self):
        if self.batch_size % self.mini_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batches {self.mini_batches}")
        return self


class DpoConfig(_Section):
    seed: int = F(0, "seed for data generation, batch order and the held-out KL samples")
    policy: Literal["sft", "lora"] = F("sft", "model to start from (and the frozen reference): dvc.yaml passes out/<policy>/model")
    train_pairs: int = F(2000, "built-in preference pairs to train on (posttrain_data, train split; 0: only data_files)", ge=0)
    test_pairs: int = F(200, "held-out built-in pairs for preference accuracy and reward margins (test split)", ge=1)
    test_prompts: int = F(200, "held-out prompts for ground-truth accuracy, reward-model score and KL (same items as sft's)", ge=1)
    data_files: list[str] = F([], "extra preference JSONL files in TRL's format (prompt/chosen/rejected as text or messages)")
    max_steps: int = F(60, "optimizer steps", gt=0)
    batch_size: int = F(32, "preference pairs per micro-batch", gt=0)
    grad_accum: int = F(1, "micro-batches per optimizer step", gt=0)
    lr: float = F(1e-4, "peak learning rate (a 4M-parameter model takes far more than the 1e-6 of large ones)", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = F("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = F(5, "linear warm-up steps", ge=0)
    beta: float = F(0.1, "DPO temperature: higher keeps the policy closer to the reference", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = F("sigmoid", "DPO loss: sigmoid = the original DPO, ipo = IPO, hinge = SLiC")
    sft_weight: float = F(1.0, "weight of an added NLL loss on the chosen reply (RPO); plain DPO lowers the chosen reply's likelihood too; 0 = plain DPO", ge=0)
    max_length: int = F(128, "truncate prompt + answer to this many tokens", gt=0)
    log_every: int = F(5, "steps between logged training metrics", gt=0)
    checkpoint_every: int = F(20, "steps between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)
    eval_batch_size: int = F(64, "prompts per batch when measuring", gt=0)
    max_new_tokens: int = F(8, "tokens generated per held-out answer", gt=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)


class GrpoConfig(_Section):
    seed: int = F(0, "seed for prompts, sampling and batch order")
    policy: Literal["sft", "lora"] = F("sft", "model to start from (and the frozen reference): dvc.yaml passes out/<policy>/model")
    train_prompts: int = F(2000, "built-in training prompts with known answers (posttrain_data, train split)", ge=0)
    test_prompts: int = F(200, "held-out prompts for ground-truth accuracy, reward-model score and KL (same items as sft's)", ge=1)
    data_files: list[str] = F([], "extra prompt JSONL files: TRL prompt-only rows, each with an \"answer\" string to verify against")
    max_steps: int = F(40, "optimizer steps; each samples group_size replies to prompts_per_step prompts", gt=0)
    prompts_per_step: int = F(8, "prompts per optimizer step", gt=0)
    group_size: int = F(8, "replies sampled per prompt; advantages are rewards relative to the group's", ge=2)
    response_length: int = F(8, "most new tokens per reply (answers are short)", gt=0)
    temperature: float = F(0.7, "sampling temperature of the replies (1.0 lost exact match here; bench/results/experiment-alignment.md)", gt=0)
    lr: float = F(5e-5, "peak learning rate (2e-4 and up lowered exact match at this scale)", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = F("constant_with_warmup", "learning-rate schedule after warm-up")
    warmup_steps: int = F(2, "linear warm-up steps", ge=0)
    kl_coef: float = F(0.04, "beta: weight of the KL penalty to the frozen starting policy (0 skips the reference and reports no training KL)", ge=0)
    epsilon: float = F(0.2, "clip range of the probability ratio", gt=0)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = F("dapo", "how token losses are averaged (TRL's default dapo has no length bias)")
    scale_rewards: Literal["group", "batch", "none"] = F("group", "divide advantages by the reward std of the group, the batch, or not at all")
    correct_weight: float = F(1.0, "weight of the verifiable reward: 1 when the reply's answer equals the known answer", ge=0)
    partial_weight: float = F(0.0, "weight of the near-miss credit: 1 - |reply - answer| / (answer + 1) for numbers, the share of words in place for text (0.5 lowered exact match here: it pays for nearby wrong numbers)", ge=0)
    format_weight: float = F(0.2, "weight of the format reward: 1 when the reply is one short line that ends its turn", ge=0)
    reward_model_weight: float = F(0.0, "weight of the learned reward model's score (0: verifiable rewards only)", ge=0)
    log_every: int = F(5, "steps between logged training metrics", gt=0)
    checkpoint_every: int = F(10, "steps between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)
    eval_batch_size: int = F(64, "prompts per batch when measuring", gt=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)

    @model_validator(mode="after")
    def _some_reward(self):
        if self.correct_weight + self.partial_weight + self.format_weight + self.reward_model_weight == 0:
            raise ValueError("correct_weight, partial_weight, format_weight and reward_model_weight are all 0: nothing to learn from")
        return self


class QuantizeConfig(_Section):
    model: Literal["best", "sft", "lora", "ppo", "dpo", "grpo"] = F(
        "best", "policy to quantise and hand on: best = highest held-out exact match among the policy stages' own "
        "measurements (the same items for each; ties go to the earlier stage), or a stage's name"
    )
    methods: list[Literal["int8", "nf4"]] = F(["int8", "nf4"], "bitsandbytes variants to write: int8 = LLM.int8(), nf4 = 4-bit NormalFloat")
    double_quant: bool = F(True, "nf4: quantise the per-block scales too (double quantisation, ~0.4 bit/param less)")
    compute_dtype: Literal["fp32", "bf16", "fp16"] = F("fp32", "nf4: dtype the dequantised weights are multiplied in")
    int8_threshold: float = F(6.0, "int8: activation outlier threshold kept in fp16 (LLM.int8 decomposition); 0 = pure int8", ge=0)
    skip_modules: list[str] = F(["lm_head"], "modules kept in full precision (embeddings are never quantised)")
    nf4_unpackable: Literal["keep", "quantize"] = F(
        "keep", "nf4: layers whose shape bitsandbytes' AVX512-BF16 CPU kernel cannot take (in_features % 64 or "
        "out_features % 32 not 0): keep = full precision, the folder runs on any machine with plain transformers; "
        "quantize = 4-bit anyway (GPUs, other CPUs, and lmforge's own loaders everywhere)"
    )
    ppl_tokens: int = F(8192, "held-out tokens (val split, equal share per source) for perplexity; the same for every variant", gt=0)
    batch_size: int = F(8, "sequences per forward pass when measuring perplexity", gt=0)
    gen_prompt: str = F("The ", "fixed prompt for the generation-speed measurement")
    gen_tokens: int = F(64, "new tokens per timed greedy generation", gt=0)
    gen_repeats: int = F(3, "timed generations per variant; the fastest counts (shared machines are noisy)", gt=0)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "where variants are measured; auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)


class EvaluateConfig(_Section):
    seed: int = F(0, "seed for sampling the benchmark items")
    variants: list[Literal["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4"]] = F(
        ["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4"], "models to compare; only these need to exist (dvc.yaml passes each as --<variant> DIR)"
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
    batch_size: int = F(32, "lm-eval batch size", gt=0)
    log_samples: bool = F(True, "keep every example's prompt, output and score in lm_eval/<variant>.json")
    extra_tasks: list[str] = F([], "more lm-eval tasks by name or YAML path (e.g. hellaswag); skipped with a warning if their data is unavailable")
    extra_limit: int = F(100, "examples per extra task", gt=0)
    allow_network: bool = F(False, "let extra tasks download datasets; off: HF offline mode, only locally cached data")
    extra_timeout_s: float = F(120.0, "give up on an extra task whose data takes longer than this to load", gt=0)
    gate_metric: str = F("arith_gen.exact_match", "quality gate: table column (<task>.<metric>) compared with base")
    gate_variant: Literal["base", "sft", "lora", "ppo", "dpo", "grpo", "int8", "nf4"] = F(
        "grpo", "quality gate: variant that must beat base"
    )
    min_gain_over_base: float | None = F(
        None, "quality gate: fail unless gate_variant's gate_metric >= base's + this (null: no gate)"
    )
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto picks cuda when available")
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


# --------------------------------------------------------------------------------------------- launch
class LaunchConfig(_Section):
    """How the training stages' commands start their workers. Not a DVC param of any stage: N processes
    compute what one does (same global batch and schedule; tests/test_distributed.py), so changing the
    process count does not invalidate outputs. The node's rank comes from LMFORGE_NODE_RANK (default 0),
    since it differs between machines running the same params.yaml."""

    nproc_per_node: int = F(1, "worker processes per machine (one per GPU on CUDA); 1 with nnodes 1 = no launcher", ge=1)
    nnodes: int = F(1, "machines taking part; each runs the same stage command", ge=1)
    rdzv_endpoint: str = F("127.0.0.1:29500", "host:port of the rendezvous on the first machine (several machines only)")
    backend: Literal["auto", "gloo", "nccl"] = F("auto", "collectives: auto = nccl on CUDA, gloo on CPU")
    strategy: Literal["ddp", "fsdp"] = F(
        "ddp", "ddp: a full model copy per process; fsdp: parameters, gradients and optimizer state sharded"
    )
    stages: list[Literal["pretrain", "sft", "lora", "reward", "ppo", "dpo", "grpo"]] = F(
        ["pretrain", "sft", "lora", "reward", "ppo", "dpo", "grpo"], "training stages that start nproc_per_node x nnodes workers"
    )
    max_restarts: int = F(0, "torchrun restarts of a failed worker group before the stage fails (the flow retries too)", ge=0)


SECTIONS: dict[str, type[_Section]] = {
    "mix": MixConfig,
    "tokenizer": TokenizerConfig,
    "pretrain": PretrainConfig,
    "sft": SftConfig,
    "lora": LoraConfig,
    "reward": RewardConfig,
    "ppo": PpoConfig,
    "dpo": DpoConfig,
    "grpo": GrpoConfig,
    "quantize": QuantizeConfig,
    "evaluate": EvaluateConfig,
    "launch": LaunchConfig,
}
assert tuple(SECTIONS) == SECTION_NAMES


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
        raise ConfigError(f"{source}: unknown section {stage!r} (sections: {', '.join(SECTION_NAMES)})")
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

    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
        data = YAML(typ="safe", pure=True).load(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None) if isinstance(err, MarkedYAMLError) else None
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
    if data is None:  # an empty file would silently run every stage at its defaults
        raise ConfigError(f"{path}: empty (write it with `python -m lmforge.cli.preset default`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, _Section]:
    """Every section of a params file, validated. Unknown sections are an error too."""
    data = read_yaml(path)
    unknown = sorted(set(data) - set(SECTION_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (sections: {', '.join(SECTION_NAMES)})")
    return {name: parse_section(name, data.get(name), str(path)) for name in SECTION_NAMES}


def load_stage(stage: str, path: str | Path = "params.yaml") -> _Section:
    return parse_section(stage, read_yaml(path).get(stage), str(path))
