"""The docs stay true mechanically.

1. Knob tables: every section of `lmforge.config.SECTIONS` has a table in docs/stages.md, and each table is
   exactly what `python -m lmforge.cli.docs` generates from the pydantic models (run it after changing a knob).
2. No hand-written figures: README.md and docs/*.md (docs/benchmarks.md and docs/profiles.md excepted: `python -m
   bench` and `python -m bench.profiling` write them)
   contain no measured figure outside what a command writes. A figure is a number with a unit of measure
   (`12 s`, `3.5 min`, `40%`, `1.13×`, `7.5 MB`, `3,993 tokens/s`, ...) or a decimal number (`0.19`, `4.22`).
   Not scanned: fenced code blocks and inline code (commands and knob values, not measurements), the generated
   knob tables, dotted versions (`2.13.0`) and named versions (`Python 3.11`, `SQLAlchemy 2.0`). Figures belong
   in generated files, which the prose links: docs/benchmarks.md (`make bench`; `python -m bench --render`),
   docs/default-run/report.md (the report card `make run` writes), the knob tables.
   docs/findings/ is not scanned: each finding is the dated record of one experiment and its numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.cli import docs
from lmforge.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
GENERATED = {ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "profiles.md"}
UNIT = (r"(?:%|×|ms|s|sec|seconds?|min|minutes?|h|hours?|[KMGT]i?B|[KMG]?FLOP/s|tokens?/s|bytes?/token|"
        r"steps?/s|it/s|GHz)")
FIGURE = re.compile(rf"(?<![\w.])(?:\d[\d,]*(?:\.\d+)?\s?{UNIT}(?![\w/])|\d+\.\d+(?![\w.]))")
VERSION = re.compile(r"\b(?:Python|SQLAlchemy|TRL|Prefect|MLflow|PyTorch|torch|bitsandbytes|transformers|PEFT|DVC|"
                     r"uv|pip)s?:?\s+\d+(?:\.\d+)+(?:(?:,| and| or)\s+\d+(?:\.\d+)+)*")
DOTTED = re.compile(r"\b\d+(?:\.\d+){2,}\b")


def hand_written_docs() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p not in GENERATED)


def prose(text: str) -> str:
    """The text a person writes: without code, generated knob tables and version numbers."""
    text = docs.BLOCK.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets (file names may hold digits)
    return DOTTED.sub("", VERSION.sub("", text))


def figures(text: str) -> list[str]:
    return [m.group(0) for m in FIGURE.finditer(prose(text))]


def test_every_section_has_its_generated_knob_table():
    text = docs.STAGES_DOC.read_text()
    assert sorted(docs.sections_in(text)) == sorted(SECTIONS), "docs/stages.md: one knobs block per section"
    assert docs.render(text) == text, "knob tables differ from lmforge/config: run `python -m lmforge.cli.docs`"


def test_a_changed_default_shows_in_the_table():
    table = docs.table("pretrain")
    assert "| `pretrain.lr` |" in table and SECTIONS["pretrain"].model_fields["lr"].description in table
    stale = docs.STAGES_DOC.read_text().replace("| `pretrain.lr` | `", "| `pretrain.lr` | `9", 1)
    assert docs.render(stale) != stale


@pytest.mark.parametrize("path", hand_written_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_written_figures(path):
    found = figures(path.read_text())
    assert not found, (f"{path.relative_to(ROOT)} writes figures by hand: {found[:10]}; link the generated file "
                       "that holds them (docs/benchmarks.md, docs/default-run/report.md)")


def test_the_figure_guard_catches_figures_and_spares_code_and_versions():
    assert figures("The run took 476 s and SFT reached 0.19; pretrain ran at 4,866 tokens/s, 1.13× the loop.") \
        == ["476 s", "0.19", "4,866 tokens/s", "1.13×"]
    assert figures("Python 3.11, 3.12 and 3.13; torch 2.13.0; `sft.lr: 3e-3`; a 4-bit model on a 2-core CPU.\n"
                   "```\nmake run  # 10 s\n```\n[a](bench/x-1.5.md)") == []


def test_links_between_docs_resolve():
    for path in hand_written_docs():
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links {target}, which is missing"
