"""What the evaluate table says about each variant beyond its scores: each score's 95% interval, the held-out text
it forgot (bits/byte per source above `forgetting_limit` times the base's) and the multiple-choice tasks where it
scores below chance. The table, the report card and the README's figures read these; nothing is judged by eye."""

from __future__ import annotations

from lmforge.stats import mean_interval

BITS = ".bits_per_byte"


def chance(metric: str, cfg) -> float | None:
    """The score of a uniform guess on a multiple-choice metric (an EvaluateConfig says how many options)."""
    task = metric.split(".")[0]
    options = {"arith_mc": cfg.mc_choices, "cloze": cfg.cloze_choices}.get(task)
    return 1 / options if options and metric.split(".")[1] in ("acc", "acc_norm") else None


def intervals(items: dict[str, dict[str, dict]], seed: int) -> dict[str, dict[str, dict]]:
    """{variant: {task.metric: mean_interval}} from the per-item scores."""
    return {v: {m: mean_interval([per_item[d] for d in sorted(per_item)], seed=seed) for m, per_item in scores.items()}
            for v, scores in items.items()}


NOT_FROM_BASE = ("distill",)  # variants not trained from base (the distilled student starts from scratch)


def forgetting(rows: dict[str, dict[str, float]], limit: float) -> dict[str, dict[str, float]]:
    """{variant: {ppl_<source>.bits_per_byte: ratio to base}} for every source where the ratio exceeds `limit`,
    among the variants trained from base."""
    base = rows.get("base", {})
    out: dict[str, dict[str, float]] = {}
    for variant, row in rows.items():
        for metric, value in row.items():
            if (variant != "base" and variant not in NOT_FROM_BASE and metric.endswith(BITS) and base.get(metric)
                    and value is not None):
                ratio = value / base[metric]
                if ratio > limit:
                    out.setdefault(variant, {})[metric] = round(ratio, 3)
    return out


def below_chance(rows: dict[str, dict[str, float]], spans: dict[str, dict[str, dict]], cfg) -> dict[str, dict]:
    """{variant: {metric: {"score", "chance", "hi"}}} where a multiple-choice score's whole interval lies below
    chance (a point estimate under it, with an interval that reaches it, is noise)."""
    out: dict[str, dict] = {}
    for variant, row in rows.items():
        for metric, value in row.items():
            level = chance(metric, cfg)
            span = spans.get(variant, {}).get(metric) or {}
            hi = span.get("hi", value)
            if level is not None and value is not None and hi is not None and hi < level:
                out.setdefault(variant, {})[metric] = {"score": value, "chance": round(level, 4), "hi": hi}
    return out


def flag_lines(table: dict) -> list[str]:
    """One line per flagged variant, for table.md and the report card."""
    lines = []
    limit = table.get("forgetting_limit")
    for variant, ratios in (table.get("forgetting") or {}).items():
        worst = ", ".join(f"{m.removesuffix(BITS).removeprefix('ppl_')} {r:.2f}x" for m, r in ratios.items())
        lines.append(f"**{variant}: forgetting** (held-out bits/byte over {limit}x the base's: {worst})")
    for variant, metrics in (table.get("below_chance") or {}).items():
        worst = ", ".join(f"{m} {x['score']:.3f} (interval up to {x['hi']:.3f}, chance {x['chance']:.3f})"
                          for m, x in metrics.items())
        lines.append(f"**{variant}: below chance** on {worst}")
    return lines
