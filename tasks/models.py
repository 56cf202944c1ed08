"""Model folders as stages hand them on: checks before heavy work, loading (quantised or not), tokenizers
with lmforge's chat format, generation defaults. Shared by every stage after pretrain."""

from __future__ import annotations

from pathlib import Path

from tasks import chat, lowbit
from tasks.stage import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
LOWBIT_LAYERS = ("Linear8bitLt", "Linear4bit")


def check_model_dir(path: str | Path, what: str) -> Path:
    """A saved model with its tokenizer, or InputError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"missing {what}: {path} does not exist (run the stage that produces it first)")
    if not (path / "config.json").is_file():
        raise InputError(f"{what}: {path} has no config.json (not a saved model)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(f"{what}: {path} has no tokenizer (tokenizer.json) beside the model")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise InputError(f"{what}: {path} has no weight files (*.safetensors)")
    return path


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model dir (config and tokenizer excluded)."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def is_quantized(model) -> bool:
    return any(type(m).__name__ in LOWBIT_LAYERS for m in model.modules())


def ready_lowbit(model, device_type: str, training: bool = False):
    """Make a model with bitsandbytes layers safe on this machine's kernels (see tasks.lowbit); say once
    which 4-bit kernel it gets. Returns the model."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        lowbit.guard_packed_path(model, training=training)
        lowbit.kernel_note(device_type)
    return model


def load_causal_lm(path: str | Path, device, **kwargs):
    """A model dir, quantised or not, on `device` in eval mode (a quantization_config in config.json applies itself)."""
    from transformers import AutoModelForCausalLM

    lowbit.quiet()
    if device.type == "cuda":  # bnb weights must be placed at load time; .to() is refused for them
        kwargs.setdefault("device_map", {"": device.index or 0})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device.type != "cuda":
        model = model.to(device) if not is_quantized(model) else model
    return ready_lowbit(model, device.type).eval()


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model, checked for what post-training needs (chat template, pad token)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(f"{model_dir}: no tokenizer beside the model (tokenizer.json missing)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.chat_template:
        raise InputError(f"{model_dir}: the tokenizer has no chat template (the tokenizer stage sets one)")
    if tok.pad_token is None:
        raise InputError(f"{model_dir}: the tokenizer has no pad token")
    return tok


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at end-of-turn, or at eos for models that never learnt the chat format."""
    ids = [tokenizer.convert_tokens_to_ids(chat.END), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


def set_generation_defaults(model, tokenizer) -> None:
    """Saved models stop at <|end|> when a user calls generate() without arguments."""
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
