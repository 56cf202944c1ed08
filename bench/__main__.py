"""python -m bench [--only ROW ...] [--full] [--quick] [--out DIR] [--render]: run the benchmark rows, write
bench/results/latest.json and docs/benchmarks.md. With --only, the rows not re-run are kept from the previous
results, each with the date, commit and machine of the run that measured it. --render only rewrites the page."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from bench import orchestration, records, report, serving, tokenizing, training
from bench.core import ROOT, BenchError, Context, Row, Skip, load_avg, log, sizes_for

# name, number, title (for rows that do not run), function(ctx) -> rows; run in this order
GROUPS: list[tuple[str, str, str, Callable]] = [
    ("pretrain", "1", "Pretraining throughput (pretrain stage)", training.pretrain_rows),
    ("mfu", "2", "Pretraining FLOP/s vs matmul peak (MFU)", training.mfu_rows),
    ("sft", "3a", "SFT and LoRA throughput (sft, lora stages)", training.sft_rows),
    ("ppo", "3b", "PPO throughput (ppo stage)", training.ppo_rows),
    ("tokenizer", "4", "Tokenizer stage vs sentencepiece", tokenizing.tokenizer_rows),
    ("orchestration", "5", "Whole flow, every stage cached (python -m flows.lifecycle)", orchestration.flow_rows),
    ("prefect", "5b", "Prefect start-up", orchestration.prefect_rows),
    ("stage_overhead", "6", "Per-stage overhead of Prefect + DVC + MLflow", orchestration.stage_overhead_rows),
    ("lifecycle", "7", "Default lifecycle, all stages, 2-core CPU", records.lifecycle_rows),
    ("quantize", "8", "Quantised generation vs fp32", records.quantize_rows),
    ("tests", "9", "Test suite (make test's pytest, one worker per core), 2-core CPU", records.test_rows),
    ("serving", "10", "Export (GGUF) and serving (OpenAI-compatible API)", serving.serving_rows),
    ("compression", "11", "Compression: QAT and GPTQ vs post-training rounding; distillation vs its control",
     records.compression_rows),
]


def selected(only: list[str] | None) -> list[tuple[str, str, str, Callable]]:
    """Groups by name or by number ("3" picks 3a and 3b, "5" picks 5 and 5b)."""
    if not only:
        return GROUPS
    picked = [g for g in GROUPS if any(o == g[0] or o == g[1] or g[1].rstrip("abcde") == o for o in only)]
    unknown = [o for o in only if not any(o == g[0] or o == g[1] or g[1].rstrip("abcde") == o for g in GROUPS)]
    if unknown:
        names = ", ".join(f"{g[1]} {g[0]}" for g in GROUPS)
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; rows: {names}")
    return picked


def run_group(ctx: Context, name: str, number: str, title: str, fn: Callable, previous: dict) -> list[Row]:
    start, load_start = time.perf_counter(), load_avg()
    log(f"row {number} {name}: start")
    try:
        rows = fn(ctx, previous.get("test_suite")) if name == "tests" else fn(ctx)
    except Skip as why:
        rows = [Row(number, name, title, status="skipped", note=str(why))]
    except (BenchError, Exception) as err:  # one broken row must not lose the others
        traceback.print_exc()
        rows = [Row(number, name, title, status="error", note=f"{type(err).__name__}: {err}"[:600])]
    seconds = round(time.perf_counter() - start, 1)
    for row in rows:
        row.details.setdefault("row_seconds", seconds)
        row.details.setdefault("load_avg", [load_start, load_avg()])
    log(f"row {number} {name}: {rows[0].status} in {seconds} s")
    return rows


def group_of(row: dict) -> str:
    """The group a row belongs to: recorded since rows carry it, else from its number ("4b" -> 4, "5c" -> 5b)."""
    if row.get("group"):
        return row["group"]
    number = str(row.get("number", ""))
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
    candidates = [g for g in GROUPS if g[1].rstrip("ab") == digits and g[1] <= number]
    return max(candidates, key=lambda g: g[1])[0] if candidates else ""


def merge(new: list[dict], previous: dict, ran: set[str]) -> list[dict]:
    """Rows in GROUPS order: the groups that did not run as the previous results had them; in a group that ran,
    each row it wrote replaces the row of that key, and the group's other rows stay with their own run (row 11
    from another preset's records keeps the default preset's rows beside it)."""
    old = report.rows_with_runs(previous) if previous else []
    fresh = {r["key"]: r for r in new}
    merged = []
    for name, *_ in GROUPS:
        before = [r for r in old if group_of(r) == name]
        if name not in ran:
            merged += before
            continue
        seen = {r["key"] for r in before}
        merged += [fresh.get(r["key"], r) for r in before]
        merged += [r for r in new if group_of(r) == name and r["key"] not in seen]
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", nargs="+", metavar="ROW", help="rows by name or number: " +
                    ", ".join(f"{g[1]}={g[0]}" for g in GROUPS))
    ap.add_argument("--full", action="store_true",
                    help="also run the default lifecycle (row 7) and the test suite (row 9) here: minutes")
    ap.add_argument("--quick", action="store_true", help="smallest sizes: checks the machinery, figures mean little")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for latest.json")
    ap.add_argument("--records", type=Path, default=ROOT,
                    help="project whose out/*/metrics.json rows 7-8 read (only read, never written)")
    ap.add_argument("--workdir", type=Path, help="temporary workspace (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the workspace (for looking into a failed row)")
    ap.add_argument("--doc", type=Path, help="the page to write (default: docs/benchmarks.md for the default --out, "
                    "else OUT/benchmarks.md)")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite the page from OUT/latest.json")
    args = ap.parse_args(argv)
    if args.render:
        doc = report.render(args.out / "latest.json", args.doc or report.default_doc(args.out))
        log(f"wrote {doc} from {args.out / 'latest.json'}")
        return 0
    groups = selected(args.only)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from bench.machine import describe

    import torch

    sizes = sizes_for(args.quick, torch.cuda.is_available())
    ctx = Context(sizes, full=args.full, records=args.records, workdir=args.workdir, keep=args.keep)
    log(f"sizes {sizes.name}, workspace {ctx.workdir}")
    machine = describe()
    commit, created = report.git_commit(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    previous = report.previous_rows(args.out)
    start, load_start = time.perf_counter(), load_avg()
    rows: list[Row] = []
    group: dict[int, str] = {}  # id(row) -> the group that produced it
    try:
        for name, number, title, fn in groups:
            for row in run_group(ctx, name, number, title, fn, previous):
                rows.append(row)
                group[id(row)] = name
    finally:
        ctx.close()
    load_end = load_avg()
    usable = machine["usable_cpus"] or 1
    run_args = list(argv if argv is not None else sys.argv[1:])
    noisy = bool(load_start is not None and load_start > 0.5 * usable)
    this_run = {"created": created, "commit": commit, "args": run_args, "machine": machine,
                "load": {"start": load_start, "end": load_end}, "noisy": noisy}
    new_rows = []
    for row in rows:
        d = dict(row.as_dict(), group=group[id(row)])
        # the test-suite time carried forward (row 9 without --full) keeps the run that measured it
        carried = d["key"] == "test_suite" and d["details"].get("source") == "recorded" and d["key"] in previous
        d["run"] = previous[d["key"]]["run"] if carried else this_run
        new_rows.append(d)
    result = {
        "created": created,
        "commit": commit,
        "args": run_args,
        "sizes": asdict(sizes),
        "machine": machine,
        "load": {"start": load_start, "end": load_end},
        # other work on the machine when we started (ours comes on top during the run)
        "noisy": noisy,
        "duration_s": round(time.perf_counter() - start, 1),
        "rows": merge(new_rows, report.previous_result(args.out), {g[0] for g in groups}) if args.only else new_rows,
    }
    md, js = report.write(result, args.out, args.doc)
    print(md.read_text())
    log(f"wrote {md} and {js}")
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
