"""Typed configuration: one pydantic model per stage, one section of params.yaml each.

The models are the single source of truth for knobs, defaults and their one-line descriptions:
`configs/default.yaml` and the comments in `params.yaml` are rendered from them (`python -m lmforge.cli.preset`).
Unknown keys and wrong types are errors that name the offending key. The sections live in base (what they
share), data, training and evaluation; everything is imported from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmforge.config.base import (POLICIES, SECTION_NAMES, SHARED, STAGES, TRAINING_STAGES, Section,
                                 TrainingSection)
from lmforge.config.data import MixConfig, SourceConfig, TokenizerConfig
from lmforge.config.evaluation import EvaluateConfig, ExportConfig, QuantizeConfig, ServeConfig
from lmforge.config.training import (BaseConfig, DistillConfig, DpoConfig, GrpoConfig, LaunchConfig, LoraConfig, PpoConfig, PretrainConfig,
                                     RewardConfig, SftConfig)
from lmforge.errors import ConfigError

__all__ = [
    "STAGES", "SHARED", "SECTION_NAMES", "TRAINING_STAGES", "POLICIES", "SECTIONS", "Section", "TrainingSection",
    "SourceConfig", "MixConfig", "BaseConfig", "TokenizerConfig", "PretrainConfig", "DistillConfig", "SftConfig", "LoraConfig", "RewardConfig",
    "PpoConfig", "DpoConfig", "GrpoConfig", "QuantizeConfig", "EvaluateConfig", "ExportConfig", "LaunchConfig", "ServeConfig",
    "parse_section", "read_yaml", "load_params", "load_stage",
]

SECTIONS: dict[str, type[Section]] = {
    "mix": MixConfig,
    "base": BaseConfig,
    "tokenizer": TokenizerConfig,
    "pretrain": PretrainConfig,
    "distill": DistillConfig,
    "sft": SftConfig,
    "lora": LoraConfig,
    "reward": RewardConfig,
    "ppo": PpoConfig,
    "dpo": DpoConfig,
    "grpo": GrpoConfig,
    "quantize": QuantizeConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "launch": LaunchConfig,
    "serve": ServeConfig,
}
assert tuple(SECTIONS) == SECTION_NAMES
assert all(issubclass(SECTIONS[s], TrainingSection) for s in TRAINING_STAGES)


# ------------------------------------------------------------------------------------------- loading
def _describe(err: ValidationError, section: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_section(stage: str, raw: Any, source: str = "params") -> Section:
    """Validate one section's mapping into its typed config; raise ConfigError naming the key."""
    if stage not in SECTIONS:
        raise ConfigError(f"{source}: unknown section {stage!r} (sections: {', '.join(SECTION_NAMES)})")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {stage!r} must be a mapping, got {type(raw).__name__}")
    try:
        return SECTIONS[stage].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err, stage)}") from None


def read_yaml(path: str | Path) -> dict:
    """YAML 1.2 (as DVC writes it), so `3e-4` is a float, not a string."""
    from ruamel.yaml import YAML

    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
        data = YAML(typ="safe", pure=True).load(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None) if isinstance(err, MarkedYAMLError) else None
        where = f":{mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
    if data is None:  # an empty file would silently run every stage at its defaults
        raise ConfigError(f"{path}: empty (write it with `python -m lmforge.cli.preset default`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data


def load_params(path: str | Path = "params.yaml") -> dict[str, Section]:
    """Every section of a params file, validated. Unknown sections are an error too."""
    data = read_yaml(path)
    unknown = sorted(set(data) - set(SECTION_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (sections: {', '.join(SECTION_NAMES)})")
    return {name: parse_section(name, data.get(name), str(path)) for name in SECTION_NAMES}


def load_stage(stage: str, path: str | Path = "params.yaml") -> Section:
    return parse_section(stage, read_yaml(path).get(stage), str(path))
