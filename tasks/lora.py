"""lora: the sft task with a PEFT LoRA adapter instead of full fine-tuning (QLoRA with `qlora: true`).

The base stays frozen; only the low-rank matrices on `target_modules` train, plus (train_chat_tokens) the
embedding rows of the chat special tokens. QLoRA loads the frozen base as 4-bit NF4 through bitsandbytes
(bitsandbytes 0.50 also runs 4-bit layers on CPU, about 1.3x slower per step than LoRA at this size).

Outputs:
    adapter/   the LoRA adapter (+ tokenizer): PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    model/     the adapter merged into a full-precision copy of the base: a plain transformers model with tokenizer
    samples.jsonl, metrics (trainable share, accuracy and held-out loss before/after, accuracy of the merged model)
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge import chat
from lmforge import lowbit
from lmforge.config import LoraConfig
from lmforge.training import resume
from lmforge.training.finetune import CORPUS, answer_accuracy, finetune, prepare
from lmforge.training.skeleton import save_model
from lmforge.models import ready_lowbit
from lmforge.data.posttrain_data import conversations
from lmforge.errors import InputError
from lmforge.stage import cli, write_meta


def chat_token_ids(tokenizer) -> list[int]:
    """The role and end-of-turn tokens. Pretraining text never contains them, so their embedding rows are
    untrained noise that frozen-base LoRA could not fix: it learns much slower without these few rows. A base
    model's own chat tokens (ChatML) were trained already: none then."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (chat.SYSTEM, chat.USER, chat.ASSISTANT, chat.END)]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def load_base(base: Path, cfg: LoraConfig, device: str):
    """The frozen base: fp32, or 4-bit NF4 for QLoRA (bf16 compute on CUDA, fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not cfg.qlora:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    why = lowbit.available()
    if why:  # an environment problem, reported like bad input
        raise InputError(f"qlora needs bitsandbytes, which does not import here ({why}); set lora.qlora: false")
    from peft import prepare_model_for_kbit_training

    quant = lowbit.bnb_config("nf4", skip=None, compute_dtype="bf16" if device == "cuda" else "fp32")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": device},
                                                 use_safetensors=True, trust_remote_code=False)
    # training runs the 4-bit layers through bitsandbytes' generic path: its packed CPU kernel has no gradient
    ready_lowbit(model, device, training=True)
    # fp32 norms and input grads, so the adapters get gradients through the frozen 4-bit layers
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def adapter_config(cfg: LoraConfig, tokenizer):
    """PEFT's LoRA config from the stage's knobs."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        trainable_token_indices=(chat_token_ids(tokenizer) or None) if cfg.train_chat_tokens else None,
        task_type="CAUSAL_LM",
    )


def run(cfg: LoraConfig, *, base: Path, out: Path, tracker, checkpoints: Path | None = None,
        corpus: Path | None = None) -> dict:
    """LoRA (or QLoRA) fine-tuning of a pretrained model on chat conversations; saves the adapter and a merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer, train_convs, device = prepare(cfg, base, "lora", corpus)
    model = load_base(base, cfg, device)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise InputError(f"{base}: target_modules {missing} are not modules of this model")
    peft_config = adapter_config(cfg, tokenizer)
    trainer, metrics = finetune(cfg, model, tokenizer, train_convs, out, tracker, device, peft_config=peft_config,
                                checkpoints=checkpoints, fp=resume.fingerprint(cfg, [base], train_convs))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics.update(trainable_params=trainable, total_params=total, trainable_share=trainable / total, qlora=cfg.qlora)

    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    # Merge into a full-precision base loaded afresh (for QLoRA, never into the 4-bit weights); this also
    # proves the saved adapter loads the way a user would load it.
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True, trust_remote_code=False), adapter_dir)
    merged = merged.merge_and_unload().to(device)
    test_rows = conversations("test", cfg.test_examples, cfg.seed)
    merged_acc, _ = answer_accuracy(merged, tokenizer, test_rows, cfg.eval_batch_size, cfg.max_new_tokens)
    metrics["merged_accuracy"] = merged_acc["accuracy"]

    save_model(out / "model", merged, tokenizer, "lora", cfg, metrics, {"base": base})
    write_meta(adapter_dir, "lora", cfg, metrics, {"base": base})  # with the merged model's accuracy, as model/ has
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("lora", run, inputs=("base",), argv=argv, options={**resume.OPTION, **CORPUS})


if __name__ == "__main__":
    sys.exit(main())
