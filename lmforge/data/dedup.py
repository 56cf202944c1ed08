"""Exact and near-duplicate detection: a content hash, and MinHash over word shingles with LSH banding.

MinHash: a document is the set of its word k-grams (lower-cased, split on whitespace). Each shingle is
hashed to 64 bits; permutation p maps it with multiply-add-shift, h_p(x) = (a_p * x + b_p mod 2^64) >> 32,
and the signature keeps the minimum per permutation. Two signatures agree in a position with probability
equal to the documents' Jaccard similarity. LSH: the signature is cut into `bands` bands of `rows`;
documents that agree on a whole band become candidates, and a candidate counts as a duplicate only when
the share of agreeing positions (the estimated Jaccard) reaches the threshold. Everything is seeded, and
the word hash is CRC32 (not Python's salted `hash`), so results repeat across processes.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Sequence

import numpy as np

# fixed odd multipliers that combine up to 64 word hashes into one shingle hash (position-sensitive)
_POS = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_CHUNK = 1 << 15  # shingles hashed per numpy batch: (perms x 32k) uint64 stays ~16 MB


def exact_key(text: str) -> bytes:
    """Content hash of an (already normalised) document."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _mix(h: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: spreads the bits before multiply-shift hashing, which wants random-looking keys
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """64-bit hashes of the word k-grams of a text (one shingle of all words if it has fewer than k)."""
    if k > len(_POS):
        raise ValueError(f"shingle size {k} > {len(_POS)}")
    words = text.lower().split()
    w = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = max(len(w) - k + 1, 1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(min(k, len(w))):
            h += w[j : j + n] * _POS[j]
        return _mix(h)


class MinHasher:
    """Seeded MinHash signatures of length `perms` over word `shingle`-grams."""

    def __init__(self, perms: int = 64, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.perms, self.shingle = perms, shingle
        self.a = rng.integers(0, 2**63, size=perms, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=perms, dtype=np.uint64)

    def _minima(self, h: np.ndarray, starts: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            v = (h[None, :] * self.a[:, None] + self.b[:, None]) >> np.uint64(32)
        return np.minimum.reduceat(v, starts, axis=1).T.astype(np.uint32)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), perms) uint32 signatures; documents are batched so numpy does the work."""
        out = np.empty((len(texts), self.perms), dtype=np.uint32)
        batch: list[np.ndarray] = []
        first = size = 0
        for i, text in enumerate(texts):
            batch.append(shingle_hashes(text, self.shingle))
            size += len(batch[-1])
            if size >= _CHUNK or i == len(texts) - 1:
                starts = np.cumsum([0] + [len(b) for b in batch[:-1]])
                out[first : i + 1] = self._minima(np.concatenate(batch), starts)
                batch, first, size = [], i + 1, 0
        return out

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for checks and tests)."""
    sa, sb = set(shingle_hashes(a, k).tolist()), set(shingle_hashes(b, k).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


def near_duplicates(signatures: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """For each document, the index of an earlier kept document it nearly duplicates, else -1.

    Documents are visited in order; the first of a group is kept and later members point at it, so the
    caller's order decides which copy survives.
    """
    n, perms = signatures.shape
    if perms % bands:
        raise ValueError(f"signature length {perms} is not a multiple of {bands} bands")
    rows = perms // bands
    # one 64-bit key per band; a key collision only adds a candidate, which the Jaccard check then rejects
    weights = _POS[:rows]
    with np.errstate(over="ignore"):
        keys = (signatures.reshape(n, bands, rows).astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    match = np.full(n, -1, dtype=np.int64)
    for i, row in enumerate(keys.tolist()):
        cands = {j for band, key in enumerate(row) for j in buckets[band].get(key, ())}
        if cands:
            cand = np.fromiter(sorted(cands), dtype=np.int64, count=len(cands))
            sims = (signatures[cand] == signatures[i]).mean(axis=1)
            hit = np.flatnonzero(sims >= threshold)
            if len(hit):
                match[i] = cand[hit[0]]
                continue
        for band, key in enumerate(row):
            buckets[band].setdefault(key, []).append(i)
    return match
