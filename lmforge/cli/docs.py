"""Generated parts of the docs: each section's knob table, from the pydantic models in lmforge.config.

    python -m lmforge.cli.docs           # rewrite the tables in docs/stages.md
    python -m lmforge.cli.docs --check   # exit 1 when a committed table differs from what the models give

A table sits between `<!-- knobs:SECTION:begin -->` and `<!-- knobs:SECTION:end -->`; the prose around it is
written by hand and left alone. Rows follow the model's own field order; defaults are rendered as params.yaml
writes them.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
STAGES_DOC = ROOT / "docs" / "stages.md"
BLOCK = re.compile(r"(<!-- knobs:(?P<section>[a-z_]+):begin -->\n)(?P<body>.*?)(<!-- knobs:(?P=section):end -->)",
                   re.S)
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _allowed(field) -> str:
    """Literal choices (also inside list[...]) or the numeric bounds; empty when any value of the type goes."""
    annotation = field.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    bounds = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(bounds)


def _default(field) -> str:
    from lmforge.cli.preset import _scalar

    value = field.get_default(call_default_factory=True)
    if isinstance(value, list) and value and isinstance(value[0], (dict, BaseModel)):
        items = [v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
        return "`" + _scalar(items) + "`"
    return "`" + _scalar(value) + "`"


def table(section: str) -> str:
    from lmforge.config import SECTIONS

    model = SECTIONS[section]
    lines = ["| knob | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{section}.{name}` | {_cell(_default(field))} | {_cell(_allowed(field))} | "
                     f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """The document with every knob table regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + table(m.group("section")) + m.group(4), text)


def sections_in(text: str) -> list[str]:
    return [m.group("section") for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.cli.docs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=STAGES_DOC)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    text = args.doc.read_text()
    new = render(text)
    if args.check:
        same = new == text
        print(f"{args.doc}: knob tables {'match' if same else 'differ from'} lmforge.config "
              f"({'' if same else 'run python -m lmforge.cli.docs'})".replace(" ()", ""))
        return 0 if same else 1
    args.doc.write_text(new)
    print(f"wrote the knob tables of {args.doc} ({', '.join(sections_in(new))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
