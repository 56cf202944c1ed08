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
from lmforge.training import resume
from lmforge.training.finetune import CORPUS, finetune, prepare
from lmforge.training.skeleton import save_model
from lmforge.stage import cli


# ------------------------------------------------------------------------------------------ stage
def run(cfg: SftConfig, *, base: Path, out: Path, tracker, checkpoints: Path | None = None,
        corpus: Path | None = None) -> dict:
    """Full supervised fine-tuning of a pretrained model on chat conversations."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, train_convs, device = prepare(cfg, base, "sft", corpus)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    trainer, metrics = finetune(cfg, model, tokenizer, train_convs, out, tracker, device, checkpoints=checkpoints,
                                fp=resume.fingerprint(cfg, [base], train_convs))
    metrics["params"] = sum(p.numel() for p in model.parameters())
    save_model(out / "model", trainer.model, tokenizer, "sft", cfg, metrics, {"base": base})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("sft", run, inputs=("base",), argv=argv, options={**resume.OPTION, **CORPUS})


if __name__ == "__main__":
    sys.exit(main())
