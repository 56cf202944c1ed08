"""evaluate: every model variant on the same benchmarks, through lm-eval, into one comparison table.

Variants: base (pretrain), sft, lora (merged), ppo, dpo, grpo, quantize's int8, nf4, rtn,
gptq and qat, and distill (the student). dvc.yaml passes each
folder as `--<variant> DIR`; only those named in `evaluate.variants` must exist. Benchmarks are
lm-eval tasks over local held-out data (lmforge/lm_eval_tasks): arith_mc, arith_gen, cloze and one
rolling-perplexity task per corpus source, run in-process with `simple_evaluate` on the loaded
model (`HFLM(pretrained=model)`), so quantised folders are evaluated as they load.

Outputs: `table.json` / `table.md` (variant x metric), `lm_eval/<variant>.json` (lm-eval's own
results, per-example samples included), `benchmarks/*.jsonl` (the exact held-out items). Metrics
come back nested per variant (`int8.arith_gen.exact_match` in MLflow and DVC).

Extra lm-eval tasks (`extra_tasks`, e.g. hellaswag) run when their data is cached locally (or may be
downloaded: `allow_network`); otherwise one warning line says so and the rest runs.

Quality gate (`min_gain_over_base`): after the table is written, `gate_variant` must beat base on
`gate_metric` by that margin, or the stage fails with QualityGateError (exit code 2). A failed
stage publishes nothing (the runner removes its staging folder), so the table is printed to stderr
and logged to the MLflow run before the error is raised.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from lmforge import lm_eval_tasks as benchmarks
from lmforge import scorecard
from lmforge.config import EvaluateConfig
from lmforge.data.corpus import source_names
from lmforge.models import check_model_dir, load_causal_lm, weight_bytes
from lmforge.runtime import pick_device
from lmforge.errors import InputError
from lmforge.stage import cli, write_json
from lmforge.stats import describe, paired_gain

log = logging.getLogger("lmforge.evaluate")
VARIANTS: tuple[str, ...] = get_args(get_args(EvaluateConfig.model_fields["variants"].annotation)[0])
VARIANT_DIRS = {"base": "out/pretrain/model", "sft": "out/sft/model", "lora": "out/lora/model",
                "ppo": "out/ppo/model", "dpo": "out/dpo/model", "grpo": "out/grpo/model", "int8": "out/quantize/int8",
                "nf4": "out/quantize/nf4", "rtn": "out/quantize/rtn", "gptq": "out/quantize/gptq",
                "qat": "out/quantize/qat", "distill": "out/distill/model"}


class QualityGateError(InputError):
    """The gate variant did not beat base by the required margin (reported in one line, exit code 2)."""


# ------------------------------------------------------------------------------------ offline mode
@contextmanager
def hub_offline(enabled: bool):
    """HF offline mode for the block, also for hub/datasets modules imported earlier (they cache the flag)."""
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE)
    os.environ.update({k: "1" for k in saved_env})
    hub_constants.HF_HUB_OFFLINE = ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------- extra tasks
def _lm_eval_task_dirs(name: str) -> list[str]:
    """Folders of lm-eval's built-in tasks that define `name` (as task, group or tag).

    A full TaskManager() parses ~14k YAML files (20-40 s on a small CPU); a byte search finds the
    few folders to index instead.
    """
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    word = re.escape(name.encode())
    pattern = re.compile(rb"^(?:(?:task|group|tag):[ \t]*|[ \t]*-[ \t]*)['\"]?" + word + rb"['\"]?[ \t]*$", re.M)
    dirs = set()
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                data = (Path(folder) / f).read_bytes()
                if name.encode() in data and pattern.search(data):
                    dirs.add(folder)
    return sorted(dirs)


def _load_within(task_manager, spec: str, timeout: float) -> str | None:
    """Build the task (which loads its dataset) in a daemon thread; None if it worked, else why not."""
    outcome: dict = {}

    def target():
        try:
            task_manager.load([spec])
        except BaseException as err:  # noqa: BLE001 - any failure means "not available"
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"lm-eval-load-{spec}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"its data did not load within {timeout:.0f} s"
    if "error" in outcome:
        err = outcome["error"]
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def resolve_extra_tasks(cfg: EvaluateConfig):
    """(TaskManager or None, specs that load, {spec: reason skipped}); logs one warning per skipped task."""
    from lm_eval.tasks import TaskManager

    specs, dirs, skipped = [], set(), {}
    for spec in cfg.extra_tasks:
        if spec.endswith((".yaml", ".yml")):
            if Path(spec).is_file():
                specs.append(str(Path(spec).resolve()))
            else:
                skipped[spec] = "no such YAML file"
        elif found := _lm_eval_task_dirs(spec):
            specs.append(spec)
            dirs.update(found)
        else:
            skipped[spec] = "no lm-eval task, group or tag of that name"
    manager = TaskManager(include_path=sorted(dirs) or None, include_defaults=False) if specs else None
    available = []
    for spec in specs:
        reason = _load_within(manager, spec, cfg.extra_timeout_s)
        if reason is None:
            available.append(spec)
        else:
            hint = "" if cfg.allow_network else " (offline: only locally cached datasets; evaluate.allow_network lets it download)"
            skipped[spec] = reason + hint
    for spec, reason in skipped.items():
        log.warning("warning: evaluate: extra task %r skipped: %s", spec, reason)
    return manager, available, skipped


# ---------------------------------------------------------------------------------------- results
def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(f"{value:.6g}")


def task_metrics(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """lm-eval results -> ({task: {metric: value}}, {task.metric: higher_is_better}); stderr dropped."""
    metrics, better = {}, {}
    for task, row in results.get("results", {}).items():
        name = task.removeprefix(benchmarks.PREFIX)
        hib = results.get("higher_is_better", {}).get(task, {})
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or (number := _number(value)) is None or metric in ("sample_len",):
                continue
            label = metric if filt in ("", "none") else f"{metric}_{filt}"
            metrics.setdefault(name, {})[label] = number
            if metric in hib and hib[metric] is not None:
                better[f"{name}.{label}"] = bool(hib[metric])
    return metrics, better


def item_scores(results: dict) -> dict[str, dict]:
    """Per-item scores of the mean-aggregated metrics (accuracy, exact match): {task.metric: {doc_id: score}}."""
    out: dict[str, dict] = {}
    for task, samples in (results.get("samples") or {}).items():
        name = task.removeprefix(benchmarks.PREFIX)
        for sample in samples:
            for key, value in sample.items():
                if key in ("acc", "acc_norm", "exact_match") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(f"{name}.{key}", {})[sample["doc_id"]] = float(value)
    return out


def gains_over_base(items: dict[str, dict[str, dict]], seed: int) -> dict[str, dict[str, dict]]:
    """{variant: {task.metric: paired_gain}} against base, over the items both were scored on."""
    base = items.get("base", {})
    gains: dict[str, dict[str, dict]] = {}
    for variant, scores in items.items():
        if variant == "base":
            continue
        for metric, per_item in scores.items():
            shared = sorted(set(per_item) & set(base.get(metric, {})))
            if shared:
                gains.setdefault(variant, {})[metric] = paired_gain(
                    [base[metric][d] for d in shared], [per_item[d] for d in shared], seed=seed)
    return gains


def _fmt(value) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_table(out: Path, rows: dict[str, dict[str, float]], better: dict[str, bool], extra: dict) -> dict:
    """table.json and table.md: one row per metric, one column per variant."""
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    table = {"variants": list(rows), "metrics": columns, "higher_is_better": {c: better.get(c) for c in columns},
             "rows": rows, **extra}
    write_json(out / "table.json", table)
    arrow = {True: "↑", False: "↓", None: ""}
    lines = ["| metric | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for c in columns:
        lines.append(f"| {c} {arrow[better.get(c)]} | " + " | ".join(_fmt(rows[v].get(c)) for v in rows) + " |")
    gains = extra.get("gains_over_base") or {}
    metrics = list(dict.fromkeys(m for g in gains.values() for m in g))
    if metrics:
        lines += ["", "Gain over base on the same items, with its 95% paired-bootstrap interval:", "",
                  "| metric | " + " | ".join(gains) + " |", "|---|" + "---:|" * len(gains)]
        lines += [f"| {m} | " + " | ".join(describe(gains[v][m]) if m in gains[v] else "–" for v in gains) + " |"
                  for m in metrics]
    for flag in scorecard.flag_lines(table):
        lines.append(f"\n{flag}")
    for note in extra.get("notes", []):
        lines.append(f"\n{note}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return table


def check_gate(cfg: EvaluateConfig, rows: dict[str, dict[str, float]], better: dict[str, bool]) -> dict | None:
    if cfg.min_gain_over_base is None:
        return None
    metric, variant = cfg.gate_metric, cfg.gate_variant
    if metric not in rows["base"] or metric not in rows[variant]:
        known = ", ".join(rows["base"])
        raise QualityGateError(f"quality gate: no metric {metric!r} in the table (metrics: {known})")
    base, value = rows["base"][metric], rows[variant][metric]
    gain = value - base if better.get(metric, True) else base - value
    return {"metric": metric, "variant": variant, "value": value, "base": base, "gain": round(gain, 6),
            "min_gain": cfg.min_gain_over_base, "passed": gain >= cfg.min_gain_over_base}


def _cache_env_info() -> None:
    """lm-eval adds torch's collect_env report to every result (~4 s of subprocesses per call): compute it once."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "add_env_info", None)
    if original is None or getattr(original, "lmforge_cached", False):
        return
    cache: dict = {}

    def add_env_info(storage: dict) -> None:
        if not cache:
            original(cache)
        storage.update(cache)

    add_env_info.lmforge_cached = True
    evaluator.add_env_info = add_env_info


# -------------------------------------------------------------------------------------------- stage
def evaluate_variant(name: str, model_dir: Path, task_dir: Path, extras, cfg: EvaluateConfig, device) -> dict:
    """lm-eval results for one variant: built-in tasks, then the available extra tasks (limited)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = load_causal_lm(model_dir, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    common = dict(model=lm, log_samples=cfg.log_samples, bootstrap_iters=0, random_seed=cfg.seed,
                  numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    names = [benchmarks.PREFIX + p.stem for p in sorted(task_dir.glob("*.yaml"))]
    results = lm_eval.simple_evaluate(tasks=names, task_manager=TaskManager(include_path=str(task_dir),
                                      include_defaults=False), **common) if names else {"results": {}}
    manager, specs = extras
    if specs:
        more = lm_eval.simple_evaluate(tasks=specs, task_manager=manager, limit=cfg.extra_limit, **common)
        for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples", "group_subtasks"):
            if isinstance(more.get(key), dict):
                results.setdefault(key, {}).update(more[key])
    results["lmforge"] = {"variant": name, "model_dir": str(model_dir)}
    del lm, model
    gc.collect()
    return results


def run(cfg: EvaluateConfig, *, corpus: Path, out: Path, tracker, **variant_dirs: Path | None) -> dict:
    """Evaluate the chosen model variants on lmforge's lm-eval benchmarks and write a comparison table."""
    from lm_eval.utils import handle_non_serializable
    from transformers import AutoTokenizer

    unknown = sorted(set(variant_dirs) - set(VARIANTS))
    if unknown:
        raise TypeError(f"unknown variant argument(s): {', '.join(unknown)}")
    dirs: dict[str, Path] = {}
    for v in cfg.variants:
        if variant_dirs.get(v) is None:
            raise InputError(f"variant {v}: no model folder given (pass --{v} DIR, e.g. {VARIANT_DIRS[v]}, "
                             f"or drop {v} from evaluate.variants)")
        dirs[v] = check_model_dir(variant_dirs[v], f"{v} model")
    if {"cloze", "heldout_ppl"} & set(cfg.tasks):
        sources = source_names(corpus, "val")
        if "cloze" in cfg.tasks and cfg.cloze_source not in sources:
            raise InputError(f"{corpus}/val: no source {cfg.cloze_source!r} for the cloze task "
                             f"(sources: {', '.join(sources) or 'none'}; set evaluate.cloze_source)")
    device = pick_device(cfg.device, "evaluate", cfg.num_threads)
    _cache_env_info()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-request chatter; our own lines say what matters
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rows: dict[str, dict[str, float]] = {}
    better: dict[str, bool] = {}
    metrics: dict[str, dict] = {}
    items: dict[str, dict] = {}
    with hub_offline(not cfg.allow_network), tempfile.TemporaryDirectory(prefix="lmforge-tasks-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(dirs[cfg.variants[0]], trust_remote_code=False)
        sizes = benchmarks.write_tasks(cfg, corpus, tokenizer, out / "benchmarks", Path(tmp))
        manager, available, skipped = resolve_extra_tasks(cfg) if cfg.extra_tasks else (None, [], {})
        for v in cfg.variants:
            print(f"evaluate: {v} ({dirs[v]})", file=sys.stderr)
            results = evaluate_variant(v, dirs[v], Path(tmp), (manager, available), cfg, device)
            path = out / "lm_eval" / f"{v}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
            metrics[v], hib = task_metrics(results)
            items[v] = item_scores(results)
            better.update(hib)
            rows[v] = {f"{t}.{m}": x for t, ms in metrics[v].items() for m, x in ms.items()}
            tracker.log_metrics({v: metrics[v]})
            tracker.log_artifact(path, "lm_eval")

    gate = check_gate(cfg, rows, better)
    notes = [f"Skipped extra task {k}: {r}" for k, r in skipped.items()]
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        notes.append(f"Quality gate {verdict}: {gate['variant']} {gate['metric']} = {_fmt(gate['value'])} vs base "
                     f"{_fmt(gate['base'])} (gain {gate['gain']:+.4f}, required {gate['min_gain']:+.4f})")
    gains = gains_over_base(items, cfg.seed) if "base" in items else {}
    if not cfg.log_samples:
        notes.append("No gains with intervals: they need per-item scores (evaluate.log_samples: true).")
    spans = scorecard.intervals(items, cfg.seed)
    write_table(out, rows, better, {
        "examples": sizes, "skipped_extra_tasks": skipped, "gate": gate, "device": device.type,
        "gains_over_base": gains, "intervals": spans, "forgetting_limit": cfg.forgetting_limit,
        "size_bytes": {v: weight_bytes(dirs[v]) for v in cfg.variants},  # weights on disk: the trade-off plot's x
        "forgetting": scorecard.forgetting(rows, cfg.forgetting_limit),
        "below_chance": scorecard.below_chance(rows, spans, cfg),
        "chance": {m: c for m in dict.fromkeys(k for r in rows.values() for k in r) if (c := scorecard.chance(m, cfg))},
        "notes": notes})
    tracker.log_artifact(out / "table.md")
    tracker.log_artifact(out / "table.json")
    if gate and not gate["passed"]:
        print((out / "table.md").read_text(), file=sys.stderr)
        raise QualityGateError(
            f"quality gate failed: {gate['variant']} {gate['metric']} = {gate['value']:.4f}, base {gate['base']:.4f}, "
            f"gain {gate['gain']:+.4f} < min_gain_over_base {gate['min_gain']:+.4f} "
            "(table above and in the MLflow run; nothing published)"
        )
    return {**metrics, **({"gate": {"gain": gate["gain"], "passed": int(gate["passed"])}} if gate else {})}


def main(argv: list[str] | None = None) -> int:
    return cli("evaluate", run, inputs=("corpus",), argv=argv, options={
        v: {"type": Path, "default": None, "help": f"model folder of the {v} variant ({VARIANT_DIRS[v]})"}
        for v in VARIANTS
    })


if __name__ == "__main__":
    sys.exit(main())
