"""MinHash LSH near-duplicate detection and exact dedup keys."""

from __future__ import annotations

import random

import numpy as np

from lmforge.data import dedup
from lmforge.data.dedup import MinHasher, estimated_jaccard, exact_key, jaccard, near_duplicates


def _doc(rng: random.Random, n: int = 150) -> str:
    vocab = [f"w{i}" for i in range(3000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _edit(text: str, rng: random.Random, changes: int) -> str:
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
    return " ".join(words)


def test_exact_key_is_content_hash():
    assert exact_key("same text") == exact_key("same text")
    assert exact_key("same text") != exact_key("same text.")


def test_estimate_tracks_exact_jaccard():
    rng = random.Random(1)
    base = _doc(rng, 300)
    hasher = MinHasher(perms=128, shingle=5, seed=0)
    for changes in (0, 3, 10, 30):
        other = _edit(base, rng, changes)
        est = estimated_jaccard(hasher.signature(base), hasher.signature(other))
        assert abs(est - jaccard(base, other)) < 0.15, changes
    assert jaccard(base, base) == 1.0


def test_near_duplicates_found_and_unrelated_kept():
    rng = random.Random(2)
    docs = [_doc(rng, 300) for _ in range(60)]
    near = {60: 3, 61: 17, 62: 40}  # light edits of earlier documents
    docs += [_edit(docs[src], rng, 2) for src in near.values()]
    docs.append(docs[5].replace("w", "W"))  # shingles are lower-cased: a case change is a duplicate
    sigs = MinHasher(perms=64, shingle=5, seed=0).signatures(docs)
    match = near_duplicates(sigs, bands=16, threshold=0.8)
    assert {i: int(match[i]) for i in near} == near
    assert match[63] == 5
    assert (match[:60] == -1).all(), "unrelated documents must not be flagged"


def test_threshold_rejects_partial_overlap():
    rng = random.Random(3)
    a = _doc(rng, 200)
    b = " ".join(a.split()[:100]) + " " + _doc(rng, 100)  # shares half its words: Jaccard ~ 0.3
    sigs = MinHasher(seed=0).signatures([a, b])
    assert near_duplicates(sigs, bands=16, threshold=0.8)[1] == -1
    # one row per band makes nearly every pair a candidate; the Jaccard check then decides
    assert near_duplicates(sigs, bands=64, threshold=0.2)[1] == 0


def test_signatures_deterministic_and_batched(monkeypatch):
    rng = random.Random(4)
    docs = [_doc(rng, rng.randint(1, 80)) for _ in range(40)] + ["", "one two"]
    whole = MinHasher(seed=7).signatures(docs)
    assert whole.shape == (len(docs), 64) and whole.dtype == np.uint32
    assert np.array_equal(whole, MinHasher(seed=7).signatures(docs)), "same seed, same signatures"
    assert not np.array_equal(whole, MinHasher(seed=8).signatures(docs))
    monkeypatch.setattr(dedup, "_CHUNK", 50)  # many small batches must give the same answer
    assert np.array_equal(whole, MinHasher(seed=7).signatures(docs))
    assert np.array_equal(whole[3], MinHasher(seed=7).signature(docs[3]))
