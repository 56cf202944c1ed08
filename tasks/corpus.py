"""The corpus format `mix` writes and later stages read.

    <corpus>/train/<source>-<shard:05d>.jsonl   one {"text": ..., "source": ...} per line
    <corpus>/val/<source>.jsonl                 held-out documents of that source
    <corpus>/lmforge.json                       resolved config, stats and versions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tasks.stage import InputError

SPLITS = ("train", "val")


def shard_path(corpus: Path, split: str, source: str, shard: int | None = None) -> Path:
    name = f"{source}.jsonl" if shard is None else f"{source}-{shard:05d}.jsonl"
    return Path(corpus) / split / name


def source_names(corpus: str | Path, split: str = "val") -> list[str]:
    """Sources present in a split, sorted."""
    folder = Path(corpus) / split
    if not folder.is_dir():
        raise InputError(f"{corpus} is not a corpus: no {split}/ folder (run the mix stage)")
    return sorted({p.stem.rsplit("-", 1)[0] if split == "train" else p.stem for p in folder.glob("*.jsonl")})


def iter_docs(corpus: str | Path, split: str, source: str | None = None) -> Iterator[dict]:
    """Documents of a split (optionally one source), in file order, so reads are deterministic."""
    folder = Path(corpus) / split
    if not folder.is_dir():
        raise InputError(f"{corpus} is not a corpus: no {split}/ folder (run the mix stage)")
    pattern = "*.jsonl" if source is None else (f"{source}-*.jsonl" if split == "train" else f"{source}.jsonl")
    for path in sorted(folder.glob(pattern)):
        with path.open() as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def iter_texts(corpus: str | Path, split: str, source: str | None = None) -> Iterator[str]:
    for doc in iter_docs(corpus, split, source):
        yield doc["text"]
