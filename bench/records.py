"""Rows 7-9: figures that take minutes, read from the last run unless `--full` runs them here.

7. the default lifecycle, all nine stages, on a 2-core CPU: ≤ 10 minutes of wall time;
8. quantised generation per variant vs fp32 (the quantize stage measures it; read from its metrics);
9. the test suite as `make test` runs it (pytest, a worker per core; the environment not counted, it is already
   built), on a 2-core CPU: ≤ 10 minutes.

`--full` pins the child process to two CPUs and hides any GPU, so a bigger machine stands in for the
2-core CPU the limits are about.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

from bench.core import ROOT, Context, Row, Skip, base_env, fmt, limit_row, log, ratio_row, run_cmd

LIMIT_S = 600.0
CPUS = 2


class LifecycleKind(NamedTuple):
    key: str  # each kind of CPU keeps its own row 7, so the page shows both limits
    title: str
    limit: float
    note: str


def lifecycle_kind() -> LifecycleKind:
    """Row 7 on this machine's kind of CPU: limit 600 s with AVX2 alone, 300 s with AVX-512."""
    from lmforge.runtime import cpu_flags

    if "avx512f" in cpu_flags():
        return LifecycleKind("lifecycle_wall_avx512", "Default lifecycle, all stages, 2-core CPU with AVX-512", 300.0,
                             "limit for a CPU with AVX-512 (600 s with AVX2 alone)")
    return LifecycleKind("lifecycle_wall", "Default lifecycle, all stages, 2-core CPU with AVX2 only", LIMIT_S,
                         "limit for a CPU with AVX2 alone (300 s with AVX-512)")


def stage_metrics(out: Path) -> dict[str, dict]:
    from lmforge.config import STAGES

    found = {}
    for stage in STAGES:
        path = out / stage / "metrics.json"
        if path.exists():
            try:
                found[stage] = json.loads(path.read_text())
            except ValueError:
                continue
    return found


def _params_preset(root: Path) -> str:
    """Whether params.yaml is the default preset as the code defines it now."""
    try:
        from lmforge.cli.preset import render, resolve

        same = (root / "params.yaml").read_text() == render("default", resolve("default", root / "configs"))
        return "the default preset" if same else "not the default preset"
    except Exception:  # configs being edited: say so rather than guess
        return "of unknown preset"


def _written_from(params: Path) -> str | None:
    """The preset a params.yaml says it was written from (its header), whatever code wrote it."""
    try:
        header = re.search(r"lmforge\.cli\.preset (\w+)", params.read_text())
    except OSError:
        return None
    return header.group(1) if header else None


def full_lifecycle(ctx: Context) -> tuple[float, Path]:
    """Run the default lifecycle in a fresh project, pinned to two CPUs, against the bench's Prefect server."""
    from bench.orchestration import prefect_server

    root = ctx.project("default")
    env = base_env(LMFORGE_TRACKING="on", CUDA_VISIBLE_DEVICES="", **prefect_server(ctx).env())
    log(f"lifecycle: the default preset, all stages, {CPUS} CPUs (minutes)")
    seconds, _ = run_cmd([sys.executable, "-m", "flows.lifecycle"], root, env, timeout=3 * 3600, cpus=CPUS)
    return seconds, root / "out"


def pinned_peak(ctx: Context) -> float:
    """fp32 matmul FLOP/s on the CPUs the lifecycle is pinned to, in a child process like the lifecycle's."""
    code = ("import json, torch; from bench.machine import matmul_peak; "
            f"torch.set_num_threads({CPUS}); print(json.dumps(matmul_peak('cpu', {ctx.sizes.matmul_n}, "
            f"{ctx.sizes.matmul_seconds})))")
    _, out = run_cmd([sys.executable, "-c", code], ROOT, base_env(CUDA_VISIBLE_DEVICES=""), timeout=600, cpus=CPUS)
    return float(json.loads(out.strip().splitlines()[-1])["flops_per_s"])


def lifecycle_rows(ctx: Context) -> list[Row]:
    from lmforge.config import STAGES

    row7 = lifecycle_kind()
    if ctx.full:
        peak = ctx.memo("cpu_peak", lambda: pinned_peak(ctx))
        wall, out = ctx.memo("lifecycle", lambda: full_lifecycle(ctx))
        metrics = stage_metrics(out)
        per_stage = {s: m.get("wall_time_s") for s, m in metrics.items()}
        tflop = wall * peak / 1e12
        # CPUs compare by the work their own matmul peak would do in the lifecycle's time
        note = (f"measured here: `python -m flows.lifecycle`, default preset, pinned to {CPUS} CPUs, GPU hidden; {row7.note}; "
                f"this CPU's fp32 matmul peak on {CPUS} threads {peak / 1e9:.0f} GFLOP/s, so the run took "
                f"{tflop:.0f} TFLOP of peak time; per stage: "
                + ", ".join(f"{s} {fmt(v, 's')}" for s, v in per_stage.items()))
        return [limit_row("7", row7.key, row7.title, wall, row7.limit, note=note, per_stage=per_stage, source="measured",
                          peak_flops_per_s=peak, peak_tflop=tflop)]
    out = ctx.records / "out"
    metrics = stage_metrics(out)
    if not metrics:
        raise Skip(f"no {out}/*/metrics.json: run `make run` first, or `python -m bench --full`")
    per_stage = {s: float(m.get("wall_time_s") or 0.0) for s, m in metrics.items()}
    missing = [s for s in STAGES if s not in metrics]
    newest = max((out / s / "metrics.json").stat().st_mtime for s in metrics)
    total = sum(per_stage.values())
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest))
    note = (f"recorded: sum of the stages' wall_time_s in {out} (latest {when}), "
            f"params.yaml {_params_preset(ctx.records)}; the record does not say how many CPUs it ran on; excludes "
            f"DVC/Prefect start-up; {row7.note}; per stage: " + ", ".join(f"{s} {fmt(v, 's')}" for s, v in per_stage.items()))
    row = limit_row("7", row7.key, row7.title, total, row7.limit, note=note,
                    per_stage=per_stage, source="recorded", missing=missing)
    if missing:  # a partial sum says nothing about the limit
        row.met = None
        row.note = f"incomplete: no record of {', '.join(missing)}; " + row.note
    return [row]


def quantize_rows(ctx: Context) -> list[Row]:
    full_run = ctx._cache.get("lifecycle")  # --full: the default lifecycle this bench just ran
    path = (full_run[1] if full_run else ctx.records / "out") / "quantize" / "metrics.json"
    if not path.exists():
        raise Skip(f"no {path}: the quantize stage has not run (or is not written yet)")
    metrics = json.loads(path.read_text())
    base = metrics.get("fp32")
    if not isinstance(base, dict) or not base.get("tokens_per_s"):
        raise Skip(f"{path} has no fp32 entry with tokens_per_s to compare against")
    rows = []
    for name, m in metrics.items():
        if name == "fp32" or not isinstance(m, dict) or "tokens_per_s" not in m:
            continue
        mem, base_mem = m.get("memory_footprint_bytes"), base.get("memory_footprint_bytes")
        parts = [f"device {metrics.get('device', '?')}"]
        if mem and base_mem:
            parts.append(f"memory {mem / 2**20:.2f} MiB = {mem / base_mem:.2f}× fp32")
        if m.get("perplexity") and base.get("perplexity"):
            parts.append(f"perplexity {m['perplexity']:.3g} vs {base['perplexity']:.3g}")
        parts.append(f"read from {path}")
        rows.append(ratio_row("8", f"quantize.{name}", f"Quantised generation: {name}", float(m["tokens_per_s"]),
                              float(base["tokens_per_s"]), "tokens/s", baseline_name="fp32", note="; ".join(parts),
                              memory_bytes=mem, fp32_memory_bytes=base_mem))
    if not rows:
        raise Skip(f"{path} lists no quantised variant")
    return rows


def compression_rows(ctx: Context) -> list[Row]:
    """gptq and qat against round-to-nearest (the same int4 grid and format: the target is on this one) and against
    nf4 (bitsandbytes' NormalFloat grid, for reference), on the same held-out tokens (quantize); the distilled
    student against its control (distill). Every baseline comes from the same stage run."""
    import math

    full_run = ctx._cache.get("lifecycle")
    out = full_run[1] if full_run else ctx.records / "out"
    rows = []
    q_path = out / "quantize" / "metrics.json"
    q = json.loads(q_path.read_text()) if q_path.exists() else {}
    fp32 = (q.get("fp32") or {}).get("perplexity")

    def lost(name: str) -> float | None:  # held-out log-perplexity over fp32, nats/token
        ppl = (q.get(name) or {}).get("perplexity") if isinstance(q.get(name), dict) else None
        return math.log(ppl / fp32) if ppl and fp32 else None

    # the default preset's rows keep their bare keys; another preset's (smollm2: the real weights) sit beside them.
    # The preset is the one params.yaml says it was written from: the run's code may be older than this one.
    preset = _written_from(out.parent / "params.yaml")
    key_tail, title_tail = ("", "") if preset in ("default", None) else (f".{preset}", f" ({preset})")
    for method, target in (("qat", 0.5), ("gptq", None)):
        for baseline in ("rtn", "nf4"):
            ours, base = lost(method), lost(baseline)
            if ours is None or base is None or base <= 0:
                continue
            m = q[method]
            kept = q[baseline].get("kept_for_cpu_kernel") or 0
            note = (f"held-out perplexity fp32 {fp32:.4g}, {baseline} {q[baseline]['perplexity']:.4g}, {method} "
                    f"{m['perplexity']:.4g}; {method} took {m.get('quantize_s', 0):.0f} s"
                    + (f"; {baseline} kept {kept} layer(s) in full precision for the CPU kernel" if kept else "")
                    + f"; read from {q_path}")
            rows.append(ratio_row("11", f"compression.{method}_vs_{baseline}{key_tail}",
                                  f"{method} int4: held-out loss vs {baseline} (post-training){title_tail}", ours, base,
                                  "nats/token lost", baseline_name=baseline, at_most=target if baseline == "rtn" else None,
                                  note=note))
    d_path = out / "distill" / "metrics.json"
    d = json.loads(d_path.read_text()) if d_path.exists() else {}
    bpb = d.get("bits_per_byte") or {}
    if bpb.get("student") and bpb.get("control"):
        note = (f"teacher {d.get('teacher_source')} {bpb.get('teacher')} bits/byte; {d.get('tokens')} tokens; teacher forward "
                f"{d.get('teacher_s')} s, student {d.get('student_s')} s, control {d.get('control_s')} s; read from {d_path}")
        rows.append(ratio_row("11", f"compression.distill_vs_control{key_tail}", "Distilled student: held-out bits/byte "
                              f"vs its control (same size, steps, batches){title_tail}", bpb["student"], bpb["control"], "bits/byte",
                              baseline_name="control", note=note))
    if not rows:
        raise Skip(f"no quantize (rtn/gptq/qat) or distill metrics under {out}: run `make run` first")
    return rows


def module_seconds(report: str) -> dict[str, float]:
    """Seconds per test module from pytest's `--durations=0` lines ("1.23s call tests/test_x.py::test_y"),
    the heaviest first: where the suite's time goes."""
    totals: dict[str, float] = {}
    for seconds, module in re.findall(r"^([0-9.]+)s (?:setup|call|teardown) +([^:\s]+)::", report, re.M):
        totals[module] = totals.get(module, 0.0) + float(seconds)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def test_rows(ctx: Context, previous: dict | None = None) -> list[Row]:
    if ctx.full:
        log(f"tests: pytest -q on {CPUS} CPUs, a worker each, as `make test` runs it (minutes)")
        env = base_env(CUDA_VISIBLE_DEVICES="")
        start = time.perf_counter()
        try:
            _, stdout = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(CPUS),
                                 "--dist", "loadscope", "--durations=0"], ROOT, env, timeout=3 * 3600, cpus=CPUS)
            outcome = "passed"
        except Exception as err:  # a failing suite still has a wall time; the note says it failed, and what
            stdout, outcome = getattr(err, "output", "") or str(err), "FAILED"
        seconds = time.perf_counter() - start
        summary = next((ln for ln in reversed(stdout.splitlines()) if re.search(r"passed|failed|error", ln)), "")
        modules = module_seconds(stdout)
        heaviest = ", ".join(f"{m} {fmt(v, 's')}" for m, v in list(modules.items())[:6])
        failures = re.findall(r"^FAILED (\S+)", stdout, re.M)
        outcome += f" ({', '.join(failures)})" if failures else ""
        note = (f"pinned to {CPUS} CPUs, GPU hidden: {outcome}; {summary.strip('= ')}; worker seconds by module "
                f"(setup, call and teardown; the workers run side by side): {heaviest}")
        row = limit_row("9", "test_suite", "Test suite (make test's pytest, one worker per core), 2-core CPU",
                        seconds, LIMIT_S,
                        note="measured here, " + note, source="measured", measured_note=note,
                        recorded=time.strftime("%Y-%m-%d %H:%M"), modules=modules)
        if outcome != "passed":
            row.met = False
        return [row]
    if previous and previous.get("status") == "ok" and previous.get("ours"):
        row = Row(**{k: v for k, v in previous.items() if k in Row.__dataclass_fields__})
        when = row.details.get("recorded", "an earlier run")
        row.note = f"recorded by `python -m bench --full` at {when}, not re-run: {row.details.get('measured_note', '')}"
        row.details["source"] = "recorded"
        return [row]
    raise Skip("no recorded test-suite time: run `python -m bench --full` (or --only tests --full)")
