"""sft: full fine-tuning of the pretrained model on chat conversations with TRL's SFTTrainer.

Data: the built-in task conversations (`lmforge.data.posttrain_data`) plus optional user JSONL files, all
validated before the model is loaded. The loss covers assistant tokens only; the held-out loss and the
greedy answer accuracy are measured on the base model and after training (`lmforge.training.finetune`, shared
with the lora stage).

Outputs: `model/` (transformers model + tokenizer with its chat template), `samples.jsonl` (test
questions with the base and final answers), metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.config import SftConfig
from lmforge.training.finetune import finetune, training_conversations
from lmforge.models import context_length, load_tokenizer, set_generation_defaults
from lmforge.training.resume import fingerprint
from lmforge.runtime import pick_device
from lmforge.stage import cli, write_meta


# ------------------------------------------------------------------------------------------ stage
def run(cfg: SftConfig, *, base: Path, out: Path, tracker, checkpoints: Path | None = None) -> dict:
    """Full supervised fine-tuning of a pretrained model on chat conversations."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    tokenizer = load_tokenizer(base)  # checks the model folder's files too
    train_convs = training_conversations(cfg, tokenizer, context_length(base))  # before anything heavy
    device = pick_device(cfg.device, "sft", cfg.num_threads).type
    set_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    trainer, metrics = finetune(cfg, model, tokenizer, train_convs, out, tracker, device, checkpoints=checkpoints,
                                fp=fingerprint(cfg, [base], train_convs))
    metrics["params"] = sum(p.numel() for p in model.parameters())

    model_dir = out / "model"
    set_generation_defaults(trainer.model, tokenizer)
    trainer.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_meta(model_dir, "sft", cfg, metrics, {"base": base})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("sft", run, inputs=("base",), argv=argv, options={
        "checkpoints": {"type": Path, "default": None, "help": "scratch folder for resumable checkpoints (not an output)"}})


if __name__ == "__main__":
    sys.exit(main())
