"""The corpus format `mix` writes and later stages read.

    <corpus>/train/<source>-<shard:05d>.jsonl   one {"text": ..., "source": ...} per line
    <corpus>/val/<source>.jsonl                 held-out documents of that source
    <corpus>/lmforge.json                       resolved config, stats and versions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lmforge.errors import InputError

SPLITS = ("train", "val")


def shard_path(corpus: Path, split: str, source: str, shard: int | None = None) -> Path:
    name = f"{source}.jsonl" if shard is None else f"{source}-{shard:05d}.jsonl"
    return Path(corpus) / split / name


def source_names(corpus: str | Path, split: str = "val") -> list[str]:
    """Sources present in a split, sorted."""
    folder = Path(corpus) / split
    if not folder.is_dir():
        raise InputError(f"{corpus} is not a corpus: no {split}/ folder (run the mix stage)")
    return sorted({_source_of(p, split) for p in folder.glob("*.jsonl")})


def iter_docs(corpus: str | Path, split: str, source: str | None = None) -> Iterator[dict]:
    """Documents of a split (optionally one source), in file order, so reads are deterministic."""
    folder = Path(corpus) / split
    if not folder.is_dir():
        raise InputError(f"{corpus} is not a corpus: no {split}/ folder (run the mix stage)")
    for path in sorted(folder.glob("*.jsonl")):
        if source is not None and _source_of(path, split) != source:
            continue
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    doc["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise InputError(f"{path}:{lineno}: not a corpus document ({err!r})") from None
                yield doc


def _source_of(path: Path, split: str) -> str:
    """`<source>-00000.jsonl` in train, `<source>.jsonl` in val (source names may contain '-')."""
    return path.stem.rsplit("-", 1)[0] if split == "train" else path.stem


def iter_texts(corpus: str | Path, split: str, source: str | None = None) -> Iterator[str]:
    for doc in iter_docs(corpus, split, source):
        yield doc["text"]
