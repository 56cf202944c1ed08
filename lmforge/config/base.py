"""What every section shares: strict validation, fields that carry their one-line description, and the knobs
every training stage has (seed, device, CPU threads, resumable checkpoints)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STAGES = ("mix", "base", "tokenizer", "pretrain", "distill", "sft", "lora", "reward", "ppo", "dpo", "grpo", "quantize", "evaluate", "export")
SHARED = ("launch", "serve")  # sections that are not stages: read by commands beside them, tracked by none
SECTION_NAMES = STAGES + SHARED
TRAINING_STAGES = ("pretrain", "sft", "lora", "reward", "ppo", "dpo", "grpo")
POLICIES = ("sft", "lora", "ppo", "dpo", "grpo")  # stages whose out/<name>/model is a chat policy

Device = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent cast; int is still accepted for float
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


def F(default: Any, description: str, **bounds: Any) -> Any:
    """A field with its one-line description (the params.yaml comment) and optional bounds (ge, gt, le, lt)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=description, **bounds)
    return Field(default, description=description, **bounds)


def resumable_every(default: int, unit: str = "steps") -> Any:
    """The checkpoint_every field of a stage that resumes through lmforge.training.resume, at its own default."""
    return F(default, f"{unit} between resumable checkpoints (in --checkpoints; a rerun resumes the last); 0: none", ge=0)


class TrainingSection(Section):
    """The knobs of every training stage. A stage redeclares one to give it its own default or description
    (the field keeps its place: these come first in the stage's params.yaml section)."""

    seed: int = F(0, "seed for data, initialisation and batch order")
    device: Device = F("auto", "auto picks cuda when available")
    num_threads: int = F(0, "CPU threads for torch; 0 leaves torch's default", ge=0)
    checkpoint_every: int = resumable_every(100)
