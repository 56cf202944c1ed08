"""Apply a preset: write params.yaml from the typed defaults overlaid with `configs/<preset>.yaml`.

    python -m lmforge.cli.preset tiny            # params.yaml <- defaults + configs/tiny.yaml
    python -m lmforge.cli.preset default --check # exit 1 if params.yaml differs from that preset

The output carries every knob with its one-line description as a comment, so params.yaml stays the
readable, complete list of knobs that DVC tracks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from lmforge.errors import ConfigError
from lmforge.config import SECTION_NAMES, SECTIONS, parse_section, read_yaml

HEADER = (
    "# lmforge parameters: one section per stage; DVC tracks each section as that stage's params.\n"
    "# Written by `python -m lmforge.cli.preset {preset}` from the typed defaults in lmforge/config/ and\n"
    "# configs/{preset}.yaml. Change a knob for one run with `dvc exp run -S pretrain.lr=1e-3`.\n"
)


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted string
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {value!r}")


def render_section(stage: str, cfg: BaseModel) -> str:
    lines = [f"{stage}:"]
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"  {name}:{comment}")
            for item in value:
                # only the keys that differ from the item defaults keep the list readable
                lines.append(f"    - {_scalar(item.model_dump(exclude_defaults=True))}")
        else:
            lines.append(f"  {name}: {_scalar(value)}{comment}")
    return "\n".join(lines) + "\n"


def resolve(preset: str, configs_dir: str | Path = "configs") -> dict[str, BaseModel]:
    """Typed defaults overlaid with the preset file (section by section, key by key)."""
    path = Path(configs_dir) / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(configs_dir).glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}: no {path} (presets: {', '.join(known)})")
    overlay = read_yaml(path)
    unknown = sorted(set(overlay) - set(SECTION_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
    return {name: parse_section(name, overlay.get(name) or {}, str(path)) for name in SECTION_NAMES}


def render(preset: str, configs: dict[str, BaseModel]) -> str:
    body = "\n".join(render_section(name, configs[name]) for name in SECTION_NAMES)
    return HEADER.format(preset=preset) + "\n" + body


def render_defaults() -> str:
    """configs/default.yaml: the full schema at its defaults."""
    return render("default", {name: SECTIONS[name]() for name in SECTION_NAMES})


def apply(preset: str, params: str | Path = "params.yaml", configs_dir: str | Path = "configs") -> str:
    text = render(preset, resolve(preset, configs_dir))
    Path(params).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="name of a file in configs/ (without .yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--configs", default="configs")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    ap.add_argument("--sync-defaults", action="store_true",
                    help="first rewrite configs/default.yaml from the typed defaults (after changing a knob)")
    args = ap.parse_args(argv)
    if args.sync_defaults:
        (Path(args.configs) / "default.yaml").write_text(render_defaults())
    try:
        text = render(args.preset, resolve(args.preset, args.configs))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        same = Path(args.params).exists() and Path(args.params).read_text() == text
        print(f"{args.params} {'matches' if same else 'differs from'} preset {args.preset}")
        return 0 if same else 1
    Path(args.params).write_text(text)
    print(f"wrote {args.params} from preset {args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
