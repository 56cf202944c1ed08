"""Stage `mix`: build the pretraining corpus from weighted sources.

    read       each source in a seeded order, up to read_factor x its target (lmforge/data/sources.py)
    normalise  NFC, \\n newlines, no control characters or trailing spaces, at most two blank lines
    chunk      documents longer than max_doc_chars are cut on paragraph, then line, boundaries
    filter     too short, too many symbols, too many repeated lines
    dedup      exact (content hash), then near (MinHash LSH) across all sources; the first copy stays
    split      a document is validation when a seeded hash of its text falls under val_fraction,
               so its split never changes with the budget or the other sources
    sample     source i gets w_i / sum(w) of budget_chars; training documents are taken in seeded
               order while they fit; a source with too little text gives all it has (reported)

Outputs: out/corpus (format of lmforge/data/corpus.py), out/mixture.csv (for DVC plots), out/samples.txt.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import sys
import time
import unicodedata
from pathlib import Path

from tqdm import tqdm

from lmforge.data import corpus as corpus_format
from lmforge.config import MixConfig
from lmforge.data.dedup import MinHasher, exact_key, near_duplicates
from lmforge.data.sources import open_source, source_rng
from lmforge.errors import InputError
from lmforge.stage import cli, write_meta
from lmforge.tracking import Tracker

FILTERS = ("too_short", "symbols", "dup_lines")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # keeps \t and \n
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{4,}")
_SYMBOL = re.compile(r"[^\w\s]")
_PARAGRAPH = re.compile(r"(?<=\n\n)(?=[^\n])")  # split points after a blank line, keeping separators


# ------------------------------------------------------------------------------------------ text
def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("", _CONTROL.sub("", text))
    return _BLANKS.sub("\n\n\n", text).strip("\n")


def chunk(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars, cut between paragraphs where possible, else between lines."""
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    units: list[str] = []
    for para in _PARAGRAPH.split(text):
        if len(para) <= max_chars:
            units.append(para)
            continue
        for line in para.splitlines(keepends=True):
            units += [line[i : i + max_chars] for i in range(0, len(line), max_chars)]
    pieces, current = [], ""
    for unit in units:
        if current and len(current) + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current += unit
    pieces.append(current)
    return [p.strip("\n") for p in pieces if p.strip()]


def quality_issue(text: str, cfg: MixConfig) -> str | None:
    """The first filter a document fails, or None."""
    if len(text) < cfg.min_doc_chars:
        return "too_short"
    if len(_SYMBOL.findall(text)) > cfg.max_symbol_ratio * len(text):
        return "symbols"
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_ratio:
        return "dup_lines"
    return None


def val_score(text: str, seed: int) -> float:
    """A stable number in [0, 1) per (seed, text): below val_fraction means validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64


# ------------------------------------------------------------------------------------------ stage
def _read(name: str, reader, cap: int, max_docs: int | None, max_chars: int, stats: dict) -> list[str]:
    """Normalised, chunked documents of one source until `cap` characters (or max_docs documents)."""
    docs, chars, raw = [], 0, 0
    with tqdm(total=cap, unit="char", unit_scale=True, desc=f"mix: read {name}", mininterval=1.0,
              file=sys.stderr) as bar:
        for text in reader():
            raw += 1
            pieces = chunk(normalize(text), max_chars)
            docs += pieces
            n = sum(map(len, pieces))
            chars += n
            bar.update(min(n, cap - bar.n))
            if chars >= cap or (max_docs is not None and raw >= max_docs):
                stats["read_capped"] = True  # stop before the generator reads or parses anything more
                break
    stats.update(docs_read=raw, docs_in=len(docs), chars_in=chars)
    return docs


def _sample(docs: list[str], target: int, cfg: MixConfig, rng) -> tuple[list[str], list[str], bool]:
    """Training documents in seeded order while they fit the target, and the validation documents.

    A document whose hash falls under val_fraction is never trained on; of those, the lowest-scoring
    val_fraction / (1 - val_fraction) x the training count are kept, so validation stays in proportion
    to what was used. Returns (train, val, exhausted): exhausted when every other document was taken.
    """
    order = list(range(len(docs)))
    rng.shuffle(order)
    train, val, chars, exhausted = [], [], 0, True
    for i in order:
        text = docs[i]
        score = val_score(text, cfg.seed)
        if score < cfg.val_fraction:
            val.append((score, text))
        elif chars + len(text) <= target:  # a document that does not fit is skipped; a shorter one may
            train.append(text)
            chars += len(text)
        else:
            exhausted = False
    keep = math.ceil(len(train) * cfg.val_fraction / (1 - cfg.val_fraction))
    val = [text for _, text in sorted(val)[:keep]]
    if not val and len(train) > 1:  # a tiny source still gets held-out text: its lowest-scoring document
        val.append(train.pop(min(range(len(train)), key=lambda j: val_score(train[j], cfg.seed))))
    return train, val, exhausted


def _write(corpus: Path, name: str, train: list[str], val: list[str], shard_docs: int) -> None:
    def dump(path: Path, texts: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")

    for shard, start in enumerate(range(0, len(train), shard_docs)):
        dump(corpus_format.shard_path(corpus, "train", name, shard), train[start : start + shard_docs])
    if val:
        dump(corpus_format.shard_path(corpus, "val", name), val)


def run(cfg: MixConfig, *, out: Path, tracker: Tracker) -> dict:
    """Mix the pretraining corpus from weighted sources: normalise, filter, dedup, split, sample to budget."""
    readers = {src.name: open_source(src, cfg) for src in cfg.sources}  # validates every source first
    total_weight = sum(src.weight for src in cfg.sources)
    stats: dict[str, dict] = {}
    timings: dict[str, float] = {}

    t = time.perf_counter()
    docs: list[tuple[int, str]] = []  # (source index, text), in source order then reading order
    for k, src in enumerate(cfg.sources):
        share = src.weight / total_weight
        s = stats[src.name] = {"target_share": round(share, 6), "target_chars": int(cfg.budget_chars * share),
                               "read_capped": False}
        cap = int(s["target_chars"] * cfg.read_factor)
        docs += [(k, text) for text in _read(src.name, readers[src.name], cap, src.max_docs, cfg.max_doc_chars, s)]
        s.update(filtered={f: 0 for f in FILTERS}, exact_dups=0, near_dups=0)
    timings["read_s"] = time.perf_counter() - t

    t = time.perf_counter()
    kept, seen = [], set()
    for k, text in docs:
        s = stats[cfg.sources[k].name]
        issue = quality_issue(text, cfg)
        if issue:
            s["filtered"][issue] += 1
            continue
        key = exact_key(text)
        if key in seen:
            s["exact_dups"] += 1
            continue
        seen.add(key)
        kept.append((k, text))
    timings["filter_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.near_dedup and kept:
        hasher = MinHasher(cfg.minhash_perms, cfg.shingle_size, cfg.seed)
        texts = [text for _, text in kept]
        sigs = hasher.signatures(tqdm(texts, desc="mix: minhash", mininterval=1.0, file=sys.stderr))
        match = near_duplicates(sigs, cfg.minhash_bands, cfg.near_dup_threshold)
        for (k, _), m in zip(kept, match):
            stats[cfg.sources[k].name]["near_dups"] += int(m >= 0)
        kept = [doc for doc, m in zip(kept, match) if m < 0]
    timings["dedup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pools: dict[str, list[str]] = {src.name: [] for src in cfg.sources}
    for k, text in kept:
        pools[cfg.sources[k].name].append(text)
    splits = {}
    for src in cfg.sources:
        s = stats[src.name]
        train, val, exhausted = _sample(pools[src.name], s["target_chars"], cfg, source_rng(cfg, src, "sample"))
        splits[src.name] = train, val
        s.update(docs_train=len(train), chars_train=sum(map(len, train)),
                 docs_val=len(val), chars_val=sum(map(len, val)), exhausted=exhausted)
        s["shortfall_chars"] = max(s["target_chars"] - s["chars_train"], 0)

    if not any(s["docs_train"] for s in stats.values()):
        counts = "; ".join(f"{name}: {s['docs_in']} in, {s['docs_train']} out (filtered {s['filtered']}, "
                           f"{s['exact_dups']} exact and {s['near_dups']} near duplicates)"
                           for name, s in stats.items())
        raise InputError(f"the corpus is empty after filtering: {counts}")

    corpus = out / "corpus"
    for name, (train, val) in splits.items():
        _write(corpus, name, train, val, cfg.shard_docs)
    timings["write_s"] = time.perf_counter() - t

    total_train = sum(s["chars_train"] for s in stats.values())
    for name, s in stats.items():
        s["proportion"] = round(s["chars_train"] / total_train, 6)
        if s["exhausted"] and s["shortfall_chars"] > 0.05 * s["target_chars"]:
            hint = " (raise mix.read_factor)" if s["read_capped"] else ""
            print(f"mix: source {name!r} has {s['chars_train']} training chars after filtering, below its "
                  f"target {s['target_chars']}; it contributes all it has{hint}", file=sys.stderr)

    order = ("docs_read", "docs_in", "chars_in", "filtered", "exact_dups", "near_dups", "docs_train", "chars_train",
             "docs_val", "chars_val", "proportion", "target_share", "target_chars", "shortfall_chars", "exhausted",
             "read_capped")
    stats = {name: {key: s[key] for key in order} for name, s in stats.items()}
    totals = {key: sum(s[key] for s in stats.values())
              for key in ("docs_in", "chars_in", "exact_dups", "near_dups", "docs_train", "chars_train",
                          "docs_val", "chars_val")}
    totals["filtered"] = sum(sum(s["filtered"].values()) for s in stats.values())
    metrics = {**totals, "sources": stats, "timings": {k: round(v, 3) for k, v in timings.items()}}

    _report(out, cfg, stats, splits)
    write_meta(corpus, "mix", cfg, metrics)
    tracker.log_artifact(out / "mixture.csv")
    tracker.log_artifact(out / "samples.txt")
    return metrics


def _report(out: Path, cfg: MixConfig, stats: dict, splits: dict) -> None:
    with (out / "mixture.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "proportion", "chars_train", "target_share"])
        for name, s in stats.items():
            writer.writerow([name, s["proportion"], s["chars_train"], s["target_share"]])
    with (out / "samples.txt").open("w", encoding="utf-8") as fh:
        for name, (train, _) in splits.items():
            fh.write(f"===== {name} ({len(train)} training documents)\n{train[0][:600] if train else ''}\n\n")


def main(argv: list[str] | None = None) -> int:
    return cli("mix", run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
