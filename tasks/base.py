"""Stage `base`: the pretrained model the lifecycle starts from, once, as a plain safetensors Hugging Face folder.

With `base.source` empty (the default) there is no base: pretrain trains from random init and the folder holds
only NOT_WRITTEN, which says so. Otherwise the source (a folder, a GGUF file, a model an installed package ships, a
hub id: lmforge/pretrained.py) is loaded, dequantised where it was quantised, and saved with its tokenizer and a
chat template the later stages train and evaluate with:

    base      the base's own template (ChatML: SmolLM2, Qwen), rewritten so TRL can put the loss on replies alone
    lmforge   lmforge's chat tokens and template added (a base without a template, such as GPT-2)

    <out>/model/   config.json, model.safetensors, tokenizer (with the chat template), lmforge.json, samples.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge import chat, pretrained
from lmforge.config import BaseConfig
from lmforge.errors import InputError
from lmforge.models import NOT_WRITTEN, context_length, set_generation_defaults, weight_bytes
from lmforge.stage import cli, write_meta

PROBE = "What is 40 + 38?"  # one greedy reply saved with the model: what the base does before any training


def chat_format(cfg: BaseConfig, tokenizer) -> tuple[str, str | None]:
    """("base", its template marked for assistant-only loss) or ("lmforge", None)."""
    marked = chat.with_masks(tokenizer.chat_template) if tokenizer.chat_template else None
    if cfg.chat_format == "base" and marked is None:
        raise InputError("base.chat_format: base: the base has no chat template lmforge can mark for assistant-only "
                         "loss (lmforge's or ChatML); set base.chat_format: lmforge (or auto)")
    return ("base", marked) if cfg.chat_format != "lmforge" and marked else ("lmforge", None)


def adopt_lmforge_chat(model, tokenizer) -> None:
    """lmforge's chat tokens and template on a base without a usable one; embeddings grown to match."""
    new = [t for t in chat.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    chat.configure(tokenizer)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def probe_reply(model, tokenizer) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def run(cfg: BaseConfig, *, out: Path, tracker) -> dict:
    """Load base.source once and save it as the safetensors folder later stages read (or say there is none)."""
    model_dir = Path(out) / "model"
    model_dir.mkdir(parents=True)
    if not cfg.source:
        (model_dir / NOT_WRITTEN).write_text("base.source is empty: pretrain trains from random init\n")
        return {"source": "", "n_params": 0}
    source = pretrained.resolve(cfg.source, cfg.allow_network)
    start = time.perf_counter()
    print(f"base: loading {source.describe()}", file=sys.stderr)
    model, tokenizer = pretrained.load(source, cfg.allow_network, cfg.allow_pickle, cfg.trust_remote_code)
    load_s = time.perf_counter() - start
    kind, marked = chat_format(cfg, tokenizer)
    if kind == "lmforge":
        adopt_lmforge_chat(model, tokenizer)
    else:
        tokenizer.chat_template = marked
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    set_generation_defaults(model, tokenizer)
    reply = probe_reply(model, tokenizer)
    (model_dir / "samples.txt").write_text(f"{PROBE}\n-> {reply}\n")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    metrics = {
        "source": cfg.source,
        "file": source.describe(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "chat_format": kind,
        "vocab_size": len(tokenizer),
        "context_length": context_length(model_dir),
        "weight_bytes": weight_bytes(model_dir),
        "load_s": round(load_s, 2),
    }
    write_meta(model_dir, "base", cfg, metrics, {"source": cfg.source})
    tracker.log_artifact(model_dir / "samples.txt")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("base", run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
