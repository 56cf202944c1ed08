"""python -m bench.profiling [--steps N] [--doc PATH]: where a training step of the sft and lora stages spends
its time. Each stage's own trainer (packed batches, the default preset's settings, a model of the default shape)
runs a few steps under torch.profiler; the page lists the operators with the most time of their own.
Writes docs/profiles.md (the machine and commit at the top)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import machine, report, training
from bench.core import ROOT, Context, log, sizes_for

TOP = 12


def profile_stage(ctx: Context, stage: str, warm: int, steps: int) -> dict:
    """torch.profiler's operator table over `steps` optimizer steps after `warm`, and the step time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lmforge.data import posttrain_data
    from lmforge.tracking import NullTracker
    from lmforge.training import finetune
    from tasks import lora

    cfg = training.sft_config(ctx, stage).model_copy(update={"max_steps": warm + steps, "log_every": warm + steps})
    base, (corpus, _) = training.base_model(ctx), ctx.data()
    tok, convs, device = finetune.prepare(cfg, base, stage, corpus)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = finetune.make_trainer(cfg, model, tok, convs, posttrain_data.conversations("test", 4, cfg.seed),
                                    ctx.workdir / f"profile-{stage}", device, NullTracker(), [],
                                    lora.adapter_config(cfg, tok) if stage == "lora" else None)
    captured: list = []  # the operator table, read when the profiled window closes
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=warm, active=steps, repeat=1),
                   on_trace_ready=lambda p: captured.append(p.key_averages()))
    clock: list[float] = []

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.append(time.perf_counter())  # before step(), which reads the trace out when the window closes
            prof.step()

    trainer.add_callback(Step())
    with prof:
        trainer.train()
    seconds = (clock[-1] - clock[warm - 1]) / steps
    events = sorted((e for e in captured[0] if not e.key.startswith("ProfilerStep")), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {"stage": stage, "batch_size": cfg.batch_size, "step_s": seconds, "rows": [
        (e.key, e.self_cpu_time_total / total, e.self_cpu_time_total / 1e3 / steps, e.count / steps)
        for e in events[:TOP]]}


def markdown(profiles: list[dict], m: dict, commit: str, steps: int) -> str:
    lines = ["# Where a training step goes", "",
             "<!-- Written by `python -m bench.profiling`. Do not edit by hand. -->", "",
             f"Machine: {report.machine_line(m)}. Commit {commit}. torch.profiler over {steps} optimizer steps of "
             "each stage's own trainer after a warm-up, the default preset's settings (packed batches, replay) on a "
             "model of the default shape; operators by the time spent in themselves (the share is of all operators' "
             "own time; the step time is wall time, with the profiler on).", ""]
    for p in profiles:
        lines += [f"## {p['stage']}: {p['step_s'] * 1e3:.0f} ms per step (batch {p['batch_size']})", "",
                  "| operator | share of CPU time | ms per step | calls per step |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{name}` | {share:.1%} | {ms:.1f} | {calls:g} |" for name, share, ms, calls in p["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="profiled optimizer steps per stage")
    ap.add_argument("--warm", type=int, default=3, help="steps before profiling starts")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "profiles.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(sizes_for(quick=False, cuda=False), workdir=Path(tmp))
        try:
            profiles = []
            for stage in ("sft", "lora"):
                log(f"profiling {stage}")
                profiles.append(profile_stage(ctx, stage, args.warm, args.steps))
        finally:
            ctx.close()
    args.doc.write_text(markdown(profiles, machine.describe(), report.git_commit(), args.steps) + "\n")
    log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
