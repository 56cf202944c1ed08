"""Model folders as stages hand them on: checks before heavy work, loading (quantised or not), tokenizers
with lmforge's chat format, generation defaults. Shared by every stage after pretrain."""

from __future__ import annotations

from pathlib import Path

from lmforge import chat
from lmforge import lowbit
from lmforge.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.save / pickle: loading may run code
LOWBIT_LAYERS = ("Linear8bitLt", "Linear4bit")
NOT_WRITTEN = "NOT_WRITTEN"  # a declared output folder a stage left out on purpose; the file says why


def check_model_dir(path: str | Path, what: str) -> Path:
    """A saved model with its tokenizer and readable safetensors weights, or InputError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"missing {what}: {path} does not exist (run the stage that produces it first)")
    if (path / NOT_WRITTEN).is_file():
        raise InputError(f"{what}: {path} was not written: {(path / NOT_WRITTEN).read_text().strip()}")
    if not (path / "config.json").is_file():
        raise InputError(f"{what}: {path} has no config.json (not a saved model)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(f"{what}: {path} has no tokenizer (tokenizer.json) beside the model")
    check_weights(path, what)  # folders between stages: lmforge wrote them, as safetensors with no remote code
    check_remote_code(path, what)
    return path


def check_weights(path: Path, what: str, allow_pickle: bool = False) -> None:
    """Safetensors only (their headers read and checked against the file size): pickle weights can run code
    when loaded, so a folder with nothing else is refused unless the user opts in."""
    files = [p for p in path.iterdir() if p.is_file()]
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not safe and not pickled:
        raise InputError(f"{what}: {path} has no weight files (*.safetensors)")
    if not safe and not allow_pickle:
        raise InputError(f"{what}: {path} holds only pickle weights ({', '.join(p.name for p in pickled)}), which can "
                         "run code when loaded; convert them to safetensors, or set allow_pickle: true if you trust them")
    from safetensors import safe_open

    for file in safe:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file is unusable either way
            raise InputError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def check_remote_code(path: Path, what: str, trust: bool = False) -> None:
    """A config naming its own Python classes (auto_map) needs trust_remote_code: refused unless opted in."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        try:
            data = json.loads(file.read_text()) if file.is_file() else {}
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"{file}: not valid JSON ({err})") from None
        if isinstance(data, dict) and data.get("auto_map") and not trust:
            raise InputError(f"{what}: {file} needs remote code (auto_map: {', '.join(data['auto_map'])}); "
                             "lmforge runs no code from model folders unless trust_remote_code: true")


def context_length(model_dir: str | Path) -> int | None:
    """The positions a saved model can attend over (config.json's max_position_embeddings), if it says."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    names = ("max_position_embeddings", "n_positions", "n_ctx")  # Llama-style, GPT-2's
    value = next((config[n] for n in names if isinstance(config, dict) and isinstance(config.get(n), int)), None)
    return value


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model dir (config and tokenizer excluded)."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def is_quantized(model) -> bool:
    """bitsandbytes layers, or compressed-tensors' packed int4 weights (lmforge.compress)."""
    return any(type(m).__name__ in LOWBIT_LAYERS or hasattr(m, "weight_packed") for m in model.modules())


def ready_lowbit(model, device_type: str, training: bool = False):
    """Make a model with bitsandbytes layers safe on this machine's kernels (see lmforge.lowbit); say once
    which 4-bit kernel it gets. Returns the model."""
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        lowbit.guard_packed_path(model, training=training)
        lowbit.kernel_note(device_type)
    return model


def load_causal_lm(path: str | Path, device, **kwargs):
    """A model dir, quantised or not, on `device` in eval mode (a quantization_config in config.json applies itself)."""
    from transformers import AutoModelForCausalLM

    lowbit.quiet()
    kwargs.update(use_safetensors=True, trust_remote_code=False)  # lmforge writes safetensors; no code runs
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
    if (model_dir / "config.json").is_file():  # the stage loads the model next: its weights first, in one line
        check_weights(model_dir, str(model_dir))
        check_remote_code(model_dir, str(model_dir))
    tok = read_tokenizer(model_dir)
    if not tok.chat_template:
        raise InputError(f"{model_dir}: the tokenizer has no chat template (the tokenizer stage sets one)")
    if tok.pad_token is None:
        raise InputError(f"{model_dir}: the tokenizer has no pad token")
    return tok


def read_tokenizer(folder: str | Path, chat_specials: bool = True):
    """AutoTokenizer of a folder, without remote code; one line when its files are damaged or, with
    `chat_specials`, when it lacks lmforge's chat tokens (they would be split into ordinary pieces)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - a JSON error from Rust, OSError, ValueError: all mean a bad folder
        name = "tokenizer.json" if (folder / "tokenizer.json").is_file() else "tokenizer files"
        raise InputError(f"{folder / name}: cannot load the tokenizer ({str(err).splitlines()[0][:200]})") from None
    missing = [t for t in chat.SPECIAL_TOKENS if t not in tok.get_vocab()] if chat_specials else []
    if missing and not chat.own_format(tok):
        raise InputError(f"{folder}: the tokenizer lacks lmforge's chat token(s) {', '.join(missing)} and has no chat "
                         "template of its own marked for training (make it with the tokenizer stage, or a base "
                         "model's with the base stage; see tokenizer.special_tokens)")
    return tok


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at end-of-turn, or at eos for models that never learnt the chat format."""
    ids = [chat.end_token_id(tokenizer), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


def set_generation_defaults(model, tokenizer) -> None:
    """Saved models stop at the end of a turn when a user calls generate() without arguments."""
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
