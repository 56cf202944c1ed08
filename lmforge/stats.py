"""Uncertainty of a gain measured on held-out items: a paired bootstrap over the items.

Two models scored on the same items (1/0 exact match, or any per-item score): resample the items with
replacement, recompute the mean difference, and take the 2.5% and 97.5% quantiles. A gain whose interval
holds 0 is within noise; the report card and the README say so instead of claiming it.
"""

from __future__ import annotations

import random

ITERS = 2000  # resamples: the interval's ends move by < 0.005 between seeds at 200 items


def paired_gain(before: list[float], after: list[float], iters: int = ITERS, seed: int = 0) -> dict:
    """{"gain", "lo", "hi", "n", "beyond_noise"}: mean(after - before) with its 95% paired-bootstrap interval."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same items: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        return {"gain": None, "lo": None, "hi": None, "n": 0, "beyond_noise": False}
    diffs = [a - b for a, b in zip(after, before)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo, hi = means[int(0.025 * iters)], means[min(iters - 1, int(0.975 * iters))]
    return {"gain": round(sum(diffs) / n, 4), "lo": round(lo, 4), "hi": round(hi, 4), "n": n,
            "beyond_noise": lo > 0 or hi < 0}


def describe(g: dict) -> str:
    """'+0.120 [+0.080, +0.160]' or, when the interval holds 0, the same with '(within noise)'."""
    if g.get("gain") is None:
        return "–"
    text = f"{g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
    return text if g["beyond_noise"] else text + " (within noise)"
