"""The report card: one markdown page with PNG plots, written from the stages' metrics and curves.

Reads only what the stages wrote under `out/` (metrics.json, CSV curves); a stage that has not run
yet is left out. `python -m flows.report` rewrites `out/report/` by hand; the flow does it each run.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable

from lmforge import scorecard
from lmforge.config import STAGES
from lmforge.stats import describe

# the size-quality plot's marker per kind of variant: full precision o, 8-bit square, 4-bit triangle, distilled diamond
TRADEOFF_MARKERS = {"int8": "s", "nf4": "^", "rtn": "^", "gptq": "^", "qat": "^", "distill": "D"}


def _metrics(out: Path, stage: str) -> dict | None:
    path = out / stage / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as fh:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _num(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.folder = out / "report"
        self.folder.mkdir(parents=True, exist_ok=True)

    def plot(self, name: str, draw: Callable, title: str) -> str:
        import matplotlib  # here, not at import: a flow run with nothing new to report never needs it

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        draw(ax)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.folder / f"{name}.png")
        plt.close(fig)
        return f"![{title}]({name}.png)\n"


# ------------------------------------------------------------------------------------------ sections
def section_walltime(r: Report) -> str | None:
    times = {s: m["wall_time_s"] for s in STAGES if (m := _metrics(r.out, s)) and "wall_time_s" in m}
    if not times:
        return None
    text = ("## Wall time per stage\n\nSeconds of each stage's last real run, the one that made its outputs "
            "(which stages this flow run ran or skipped is in `out/summary.md`).\n\n")
    text += _table(["stage", "seconds"], [[s, t] for s, t in times.items()])
    text += r.plot("walltime", lambda ax: (ax.barh(list(times)[::-1], list(times.values())[::-1]), ax.set_xlabel("seconds")),
                   "Wall time per stage")
    return text


def section_mix(r: Report) -> str | None:
    m = _metrics(r.out, "mix")
    if not m or "sources" not in m:
        return None
    rows = [[name, s.get("docs_in"), s.get("exact_dups"), s.get("near_dups"), s.get("docs_train"), s.get("chars_train"),
             s.get("proportion")] for name, s in m["sources"].items()]
    text = "## Data mixture\n\n" + _table(["source", "docs in", "exact dups", "near dups", "docs train", "chars train",
                                            "share"], rows)
    mix = _csv(r.out / "mix" / "mixture.csv")
    if mix:
        def draw(ax):
            names = [row["source"] for row in mix]
            ax.barh(names, [row["proportion"] for row in mix], label="actual")
            if "target_share" in mix[0]:
                ax.scatter([row["target_share"] for row in mix], names, color="black", marker="|", s=300, label="target")
            ax.set_xlabel("share of training characters")
            ax.legend()
        text += r.plot("mixture", draw, "Mixture: actual vs target share")
    return text


def section_tokenizer(r: Report) -> str | None:
    m = _metrics(r.out, "tokenizer")
    if not m:
        return None
    bpt = m.get("bytes_per_token", {})
    rows = [[k, v] for k, v in bpt.items()] if isinstance(bpt, dict) else [["all", bpt]]
    text = "## Tokenizer\n\n" + _table(["held-out source", "bytes per token"], rows)
    extra = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
    text += "\n" + _table(["figure", "value"], [[k, v] for k, v in extra.items()])
    return text


def section_pretrain(r: Report) -> str | None:
    m = _metrics(r.out, "pretrain")
    if not m:
        return None
    train, val = _csv(r.out / "pretrain/curves/train.csv"), _csv(r.out / "pretrain/curves/val.csv")
    text = "## Pretraining\n\n" + _table(
        ["params", "tokens seen", "initial val loss", "final val loss", "final val ppl", "tokens/s", "FLOP/s", "device"],
        [[m.get("n_params"), m.get("tokens_seen"), m.get("initial_val_loss"), m.get("final_val_loss"),
          m.get("final_val_ppl"), m.get("tokens_per_s"), m.get("flops_per_s"), f"{m.get('device')} {m.get('dtype')}"]],
    )
    if train or val:
        def draw(ax):
            if train:
                ax.plot([x["step"] for x in train], [x["train_loss"] for x in train], label="train", alpha=0.7)
            for key in (val[0] if val else {}):
                if key.startswith("val_loss"):
                    ax.plot([x["step"] for x in val], [x[key] for x in val], marker="o", label=key.replace("val_loss_", "val ").replace("val_loss", "val (all)"))
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/token)")
            ax.legend(fontsize=8)
        text += r.plot("pretrain_loss", draw, "Pretraining loss")
    return text


def section_quantize(r: Report) -> str | None:
    rows = _csv(r.out / "quantize" / "tradeoff.csv")
    if not rows:
        return None
    text = "## Quantisation\n\n" + _table(
        ["variant", "MB on disk", "MB in memory", "held-out ppl", "tokens/s"],
        [[x["variant"], x["size_bytes"] / 1e6, x["memory_footprint_bytes"] / 1e6, x["perplexity"], x["tokens_per_s"]]
         for x in rows],
    )
    metrics = _metrics(r.out, "quantize") or {}
    for variant, m in metrics.items():
        if isinstance(m, dict) and m.get("kept_for_cpu_kernel"):
            text += (f"\n\n{variant}: {m['kept_for_cpu_kernel']} layer(s) kept in full precision because bitsandbytes' "
                     f"packed AVX512-BF16 CPU kernel cannot take their shape ({m.get('lowbit_param_share', 0):.0%} of the "
                     "parameters are low-bit); `quantize.nf4_unpackable: quantize` converts them too.")
    kept = [f"{method} {metrics[method]['loss_vs_rtn']:.0%}" for method in ("gptq", "qat")
            if isinstance(metrics.get(method), dict) and metrics[method].get("loss_vs_rtn") is not None]
    if kept:
        text += ("\n\nAt 4 bits, share of round-to-nearest's held-out loss (log perplexity over fp32) that remains "
                 f"after calibration or training (one grid, one format; lower is better): {', '.join(kept)}.\n\n")

    def draw(ax):
        for x in rows:
            ax.scatter(x["size_bytes"] / 1e6, x["perplexity"], s=60)
            ax.annotate(f"{x['variant']} ({x['tokens_per_s']:.0f} tok/s)", (x["size_bytes"] / 1e6, x["perplexity"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("MB on disk")
        ax.set_ylabel("held-out perplexity")
    return text + r.plot("quantize_tradeoff", draw, "Quantisation: size vs perplexity")


def section_evaluate(r: Report) -> str | None:
    path = r.out / "evaluate" / "table.json"
    if not path.exists():
        return None
    table = json.loads(path.read_text())
    variants, metrics = table["variants"], table["metrics"]
    arrow = {True: " ↑", False: " ↓"}
    text = "## Evaluation across variants\n\n" + _table(
        ["metric", *variants],
        [[m + arrow.get(table["higher_is_better"].get(m), ""), *(table["rows"][v].get(m) for v in variants)]
         for m in metrics],
    )
    gains = table.get("gains_over_base") or {}
    gain_metrics = list(dict.fromkeys(m for g in gains.values() for m in g))
    if gain_metrics:
        text += ("\nGain over base on the same items, with its 95% paired-bootstrap interval (one that holds 0 is "
                 "within noise):\n\n")
        text += _table(["metric", *gains], [[m, *(describe(gains[v][m]) if m in gains[v] else None for v in gains)]
                                            for m in gain_metrics])
    flags = scorecard.flag_lines(table)
    text += "".join(f"\n{line}\n" for line in flags)
    spans, chance = table.get("intervals") or {}, table.get("chance") or {}
    scores = [m for m in metrics if table["higher_is_better"].get(m) and not m.startswith("ppl")]
    if scores:
        def draw(ax):
            width = 0.8 / len(variants)
            for i, v in enumerate(variants):
                xs = [j + i * width for j in range(len(scores))]
                ys = [table["rows"][v].get(m) or 0 for m in scores]
                lo = [y - (spans.get(v, {}).get(m) or {}).get("lo", y) for y, m in zip(ys, scores)]
                hi = [(spans.get(v, {}).get(m) or {}).get("hi", y) - y for y, m in zip(ys, scores)]
                below = table.get("below_chance", {}).get(v, {})
                ax.bar(xs, ys, width, label=v, yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8},
                       edgecolor=["red" if m in below else "none" for m in scores], linewidth=1.5)
            for j, m in enumerate(scores):  # a uniform guess, where the task has one
                if m in chance:
                    ax.hlines(chance[m], j - width / 2, j + 0.8 - width / 2, colors="grey", linestyles="--", lw=1)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))], scores, fontsize=8)
            ax.set_ylabel("score (95% interval; dashed: chance)")
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom, so the legend covers no bar
            ax.legend(fontsize=7, ncol=min(len(variants), 6), loc="upper center")
        text += r.plot("evaluate_scores", draw, "Benchmarks by variant (higher is better)")
    bits = [m for m in metrics if m.endswith(scorecard.BITS)]
    base = table["rows"].get("base", {})
    if bits and all(base.get(m) for m in bits):
        others = [v for v in variants if v != "base" and v not in scorecard.NOT_FROM_BASE]
        limit, forgot = table.get("forgetting_limit"), table.get("forgetting") or {}

        def draw_forgetting(ax):
            width = 0.8 / max(len(others), 1)
            for i, v in enumerate(others):
                ratios = [(table["rows"][v].get(m) or 0) / base[m] for m in bits]
                ax.bar([j + i * width for j in range(len(bits))], ratios, width, label=v,
                       edgecolor=["red" if m in forgot.get(v, {}) else "none" for m in bits], linewidth=1.5)
            ax.axhline(1.0, color="grey", lw=1)
            if limit:
                ax.axhline(limit, color="red", ls="--", lw=1, label=f"forgetting limit ({limit}x)")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))],
                          [m.removeprefix("ppl_").removesuffix(scorecard.BITS) for m in bits], fontsize=8)
            ax.set_ylabel("held-out bits/byte, multiple of base's")
            ax.legend(fontsize=7, ncol=3, loc="upper center")
            ax.set_ylim(0, max(ax.get_ylim()[1], (limit or 1) * 1.2) * 1.25)
        text += r.plot("evaluate_forgetting", draw_forgetting, "What fine-tuning cost the base (lower is better)")
    sizes = table.get("size_bytes") or {}
    if bits and sizes:
        def draw_tradeoff(ax):  # every variant: weights on disk against held-out bits/byte (tokenizer-free)
            # a legend, not labels by the points: variants of one size sit on top of each other
            import matplotlib

            shades = matplotlib.colormaps["tab20"].colors
            colours = iter(shades[::2] + shades[1::2])  # the ten strong colours first
            for v in variants:
                values = [table["rows"][v].get(m) for m in bits]
                if v in sizes and all(values):
                    ax.scatter(sizes[v] / 1e6, sum(values) / len(values), s=45, color=next(colours), label=v,
                               marker=TRADEOFF_MARKERS.get(v, "o"), alpha=0.85)
            ax.legend(fontsize=7, ncol=2, loc="upper right")
            ax.set_xlabel("MB on disk")
            ax.set_ylabel("held-out bits/byte, mean over sources")
        text += r.plot("evaluate_tradeoff", draw_tradeoff, "Size against quality, every variant (lower is better)")
    return text


def section_finetune(r: Report) -> str | None:
    sft, lora = _metrics(r.out, "sft"), _metrics(r.out, "lora")
    if not sft and not lora:
        return None
    rows = []
    for name, m in (("sft (full)", sft), ("lora", lora)):
        if m:
            gain = m.get("accuracy_gain")
            rows.append([name, m.get("base_accuracy"), m.get("final_accuracy"),
                         describe(gain) if isinstance(gain, dict) else gain, m.get("base_eval_loss"),
                         m.get("final_eval_loss"), m.get("trainable_share", 1.0), m.get("train_time_s")])
    text = "## Supervised fine-tuning: full vs LoRA\n\nAccuracy: greedy answers to held-out questions, exact match.\n\n"
    text += _table(["run", "base accuracy", "accuracy after", "gain [95% interval]", "base held-out loss", "held-out loss after",
                    "trainable share", "train seconds"], rows)
    bars = {"base": (sft or lora).get("base_accuracy")}
    bars.update({name: m.get("final_accuracy") for name, m in (("sft", sft), ("lora", lora)) if m})

    def draw(ax):
        ax.bar(list(bars), [v or 0 for v in bars.values()], color=["grey", "tab:blue", "tab:orange"][: len(bars)])
        ax.set_ylabel("held-out accuracy")
    return text + r.plot("finetune_accuracy", draw, "Task accuracy: base vs SFT vs LoRA")


def section_reward(r: Report) -> str | None:
    m = _metrics(r.out, "reward")
    if not m:
        return None
    rows = [[k, m.get(f"{k}_before"), m.get(k)] for k in ("test_accuracy", "test_margin", "gt_agreement")]
    return ("## Reward model\n\nPairwise accuracy on held-out preference pairs (chance = 0.5), and agreement with the\n"
            "ground-truth rule (correct answer scored above a wrong one).\n\n" + _table(["figure", "before", "after"], rows))


def section_ppo(r: Report) -> str | None:
    m = _metrics(r.out, "ppo")
    if not m:
        return None
    rows = [[k, m.get(f"{k}_before"), m.get(k)] for k in ("rm_score", "gt_accuracy", "end_rate")]
    text = "## PPO\n\nHeld-out prompts, before and after; KL to the initial policy at the end: "
    text += f"{_fmt(m.get('kl_last'))} (max {_fmt(m.get('kl_max'))}).\n\n" + _table(["figure", "before", "after"], rows)
    curves = _csv(r.out / "ppo" / "curves.csv")
    if curves:
        def draw(ax):
            steps = [c["step"] for c in curves]
            ax.plot(steps, [c["rm_score"] for c in curves], label="reward-model score")
            ax.set_xlabel("PPO update")
            ax.set_ylabel("score")
            ax2 = ax.twinx()
            ax2.plot(steps, [c["kl"] for c in curves], color="tab:red", label="KL (right axis)")
            ax2.set_ylabel("KL", color="tab:red")
            # one legend for both axes
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
        text += r.plot("ppo_curves", draw, "PPO: reward and KL over updates")
    return text


def section_alignment(r: Report) -> str | None:
    """PPO, DPO and GRPO side by side, each measured the same way on the same held-out prompts (lmforge.training.policy_eval)."""
    runs = {name: m for name in ("ppo", "dpo", "grpo") if (m := _metrics(r.out, name))}
    if not runs:
        return None
    rows = []
    for name, m in runs.items():
        gain = m.get("gt_accuracy_gain")
        rows.append([name, m.get("gt_accuracy_before"), m.get("gt_accuracy"),
                     describe(gain) if isinstance(gain, dict) else gain, m.get("rm_score_before"), m.get("rm_score"),
                     m.get("kl_ref"), m.get("train_s"), m.get("wall_time_s")])
    text = ("## Alignment: PPO vs DPO vs GRPO\n\nSame held-out prompts for each: ground-truth exact match (greedy), the "
            "learned reward model's score of those replies, and the KL from the starting policy (summed over a "
            "sampled reply). Gains carry their 95% paired-bootstrap interval; one that holds 0 is marked within "
            "noise.\n\n")
    text += _table(["method", "exact match before", "after", "gain [95% interval]", "RM score before", "after",
                    "KL from start", "train s", "stage s"], rows)
    chosen = (_metrics(r.out, "quantize") or {}).get("policy")
    if chosen:
        text += f"\nQuantised and handed on: **{chosen}** (quantize.model).\n\n"

    def draw(ax):
        names = list(runs)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [runs[n].get("gt_accuracy_before") or 0 for n in names], 0.4, label="before", color="grey")
        ax.bar([x + 0.2 for x in xs], [runs[n].get("gt_accuracy") or 0 for n in names], 0.4, label="after", color="tab:green")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("held-out exact match")
        ax.legend(fontsize=8)
    text += r.plot("alignment_accuracy", draw, "Alignment methods: exact match before and after")
    curves = _csv(r.out / "grpo" / "curves.csv")
    if curves and "reward" in curves[0]:
        def draw_grpo(ax):
            steps = [c["step"] for c in curves]
            ax.plot(steps, [c["reward"] for c in curves], label="reward (weighted)")
            if "correct" in curves[0]:
                ax.plot(steps, [c["correct"] for c in curves], label="correct share")
            ax.set_xlabel("GRPO step")
            ax.legend(fontsize=8, loc="upper left")
        text += r.plot("grpo_curves", draw_grpo, "GRPO: reward of sampled replies over steps")
    return text


def section_distill(r: Report) -> str | None:
    m = _metrics(r.out, "distill")
    if not m or not m.get("teacher_source"):
        return None
    sources = list(m.get("student") or {})
    gains = m.get("gain_over_control") or {}
    text = (f"## Distillation\n\nA student of {m['student_params'] / 1e6:.1f}M parameters learnt from `{m['teacher_source']}` "
            f"({m['teacher_params'] / 1e6:.0f}M) for {m['tokens']:,} tokens; the control is the same network from the "
            "same weights on the same batches without the teacher. Held-out bits per byte (lower is better); the "
            "student's gain over the control with its 95% paired interval:\n\n")
    text += _table(["source", "teacher", "student", "control", "gain over control"],
                   [[s, m["teacher"][s]["bits_per_byte"], m["student"][s]["bits_per_byte"],
                     (m.get("control") or {}).get(s, {}).get("bits_per_byte"),
                     describe(gains[s]) if s in gains else None] for s in sources]) + "\n"
    curves = _csv(r.out / "distill" / "curves.csv")
    if curves:
        def draw(ax):
            steps = [c["step"] for c in curves]
            ax.plot(steps, [c["student_ce"] for c in curves], label="student (with teacher)")
            if "control_ce" in curves[0]:
                ax.plot(steps, [c["control_ce"] for c in curves], label="control (data alone)")
            ax.set_xlabel("step")
            ax.set_ylabel("training cross-entropy (nats/token)")
            ax.legend(fontsize=8)
        text += r.plot("distill_curves", draw, "Distillation: the student against its control")
    return text


SECTIONS = [section_mix, section_tokenizer, section_pretrain, section_distill, section_finetune, section_reward, section_alignment,
            section_ppo, section_quantize, section_evaluate]


def write(root: str | Path = ".", title: str = "lmforge report card") -> Path:
    """Write out/report/report.md (+ PNGs) and return its path."""
    r = Report(Path(root) / "out")
    parts = [f"# {title}\n"]
    for section in [section_walltime, *SECTIONS]:
        text = section(r)
        if text:
            parts.append(text)
    path = r.folder / "report.md"
    path.write_text("\n".join(parts))
    return path


def preload() -> None:
    """Import matplotlib in a background thread: a flow calls this before its stages, whose subprocesses
    leave this process idle, so the card is drawn without waiting for the import afterwards."""
    import threading

    def load():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    threading.Thread(target=load, name="lmforge-preload-matplotlib", daemon=True).start()


def card_path(root: str | Path = ".") -> Path:
    return Path(root) / "out" / "report" / "report.md"


def up_to_date(root: str | Path = ".") -> bool:
    """Whether out/report/report.md is newer than every stage's metrics: the card reads only the stages'
    outputs, so then it would come out the same (a flow run with every stage cached keeps it)."""
    out, card = Path(root) / "out", card_path(root)
    if not card.exists():
        return False
    made = card.stat().st_mtime
    return all(m.stat().st_mtime <= made for m in out.glob("*/metrics.json"))


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "."))
