"""The steps of the training skeleton (lmforge.training.skeleton) that the alignment stages, ppo, dpo and grpo,
share: their models (a policy, its frozen reference, a frozen reward model), their held-out metrics before and
after training, measured alike (lmforge.training.policy_eval), and their outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lmforge.runtime import pick_device
from lmforge.stats import paired_gain
from lmforge.training.policy_eval import load_models, write_curves, write_samples
from lmforge.training.skeleton import save_model


# ------------------------------------------------------------------------------------------- models
def load_policies(stage: str, cfg, policy: Path, reward_model: Path, tokenizer, tracker, **counts):
    """The stage's device; on it the trainable policy, its frozen copy (the reference) and the frozen reward
    model. Their size, `counts` and the device go to the tracker, under names unlike the config keys (MLflow
    refuses to log a param twice with a different value)."""
    device = pick_device(cfg.device, stage, cfg.num_threads)
    model, ref, rm = load_models(policy, reward_model, tokenizer.pad_token_id, device)
    tracker.log_params({"n_params": sum(p.numel() for p in model.parameters()), **counts, "device_used": device.type})
    return device, model, ref, rm


# ------------------------------------------------------------------------------------------ metrics
def before_after(before: dict, after: dict, samples_before: list[dict], samples_after: list[dict], **gains) -> dict:
    """The held-out metrics after and before training, `gains`, and the ground-truth accuracy gain on the same
    items with its 95% paired-bootstrap interval (lmforge.stats)."""
    return {**after, **before, **gains,
            "gt_accuracy_gain": paired_gain([x["correct"] for x in samples_before], [x["correct"] for x in samples_after])}


# -------------------------------------------------------------------------------------------- save
def publish_policy(out: Path, stage: str, cfg, metrics: dict, inputs: Mapping[str, Path], model, tokenizer, tracker, *,
                   test: list[dict], samples_before: list[dict], samples_after: list[dict],
                   curves: list[dict] | None = None, generation_defaults: bool = True) -> None:
    """An alignment stage's outputs: curves.csv (where the stage has curves; dvc.yaml declares it, so with no step
    logged it holds just the header), samples.jsonl (each held-out prompt's reply before and after) and model/."""
    if curves is not None:
        write_curves(out / "curves.csv", curves)
        tracker.log_artifact(out / "curves.csv")
    write_samples(out / "samples.jsonl", test, samples_before, samples_after)
    tracker.log_artifact(out / "samples.jsonl")
    save_model(out / "model", model, tokenizer, stage, cfg, metrics, inputs, generation_defaults=generation_defaults)
