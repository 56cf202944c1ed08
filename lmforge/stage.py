"""What every stage's command shares: argument parsing, validation before heavy work, atomic outputs,
meta files beside artifacts, and the MLflow run.

A stage is `run(cfg, *, <inputs>, out, tracker) -> metrics`. Its `main()` is one call to `cli()`:

    def main(argv=None):
        return cli("pretrain", run, inputs=("corpus", "tokenizer"), argv=argv)

The stage writes everything into `out` (a fresh staging folder). Only when `run` returns do its
files replace the previous ones under `--out`, with `metrics.json` written last; when it fails the
staging folder is removed, so no later stage can mistake half-written output for a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pydantic import BaseModel

from lmforge import tracking
from lmforge.errors import ConfigError, InputError
from lmforge.config import load_stage

META_FILE = "lmforge.json"


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "trl", "peft", "bitsandbytes", "lm_eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_meta(directory: str | Path, stage: str, cfg: BaseModel, metrics: Mapping[str, Any] | None = None,
               inputs: Mapping[str, str | Path] | None = None, **extra: Any) -> None:
    """The resolved config and metadata beside an artifact (nanochat-style meta file), credentials masked."""
    write_json(
        Path(directory) / META_FILE,
        tracking.redact({
            "stage": stage,
            "config": cfg.model_dump(),
            "metrics": dict(metrics or {}),
            "inputs": {k: str(v) for k, v in (inputs or {}).items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": tracking.git_commit(),
            "versions": versions(),
            **extra,
        }),
    )


def require(path: str | Path, what: str) -> Path:
    """An input that must exist, with a message that says which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {what}: {path} does not exist (run the stage that produces it first)")
    return path


def _publish(staging: Path, out: Path) -> None:
    """Move each staged entry over its old version; metrics.json last, as the mark of a complete run."""
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: p.name == "metrics.json")
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    staging.rmdir()


def execute(stage: str, fn: Callable[..., dict], cfg: BaseModel, out: Path, inputs: Mapping[str, Path],
            extra: Mapping[str, Any] | None = None, tracker: tracking.Tracker | None = None) -> dict:
    """Run a stage function into a staging folder and publish its outputs; returns its metrics."""
    for name, path in inputs.items():
        require(path, name.replace("_", " "))
    from lmforge import distributed

    if distributed.is_worker() and not distributed.is_main():
        # one of several processes: it trains like rank 0, but its outputs go to a scratch folder and its
        # figures to no tracker; rank 0 publishes and tracks for all
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"lmforge-{stage}-rank{distributed.rank()}-") as scratch:
            return _call(fn, cfg, Path(scratch), inputs, extra, tracking.NullTracker(), time.perf_counter())
    out = Path(out)
    staging = out.parent / f".{out.name}.staging"
    try:  # a read-only or missing disk is found now, not after hours of training
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        if out.is_dir():  # publishing moves entries into it (a new one is made beside the staging folder)
            probe = out / f".lmforge-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"cannot write the output folder {out}: {err.strerror or err}") from None
    start = time.perf_counter()
    try:
        if tracker is None:
            with tracking.stage_run(stage, cfg.model_dump()) as tracker:
                metrics = _call(fn, cfg, staging, inputs, extra, tracker, start)
        else:
            metrics = _call(fn, cfg, staging, inputs, extra, tracker, start)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out)
    return metrics


def _call(fn, cfg, staging, inputs, extra, tracker, start) -> dict:
    metrics = tracking.redact(dict(fn(cfg, out=staging, tracker=tracker, **inputs, **(extra or {})) or {}))
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    tracker.log_metrics(metrics)
    write_json(staging / "metrics.json", metrics)
    tracker.log_artifact(staging / "metrics.json")
    return metrics


def cli(stage: str, fn: Callable[..., dict], inputs: Iterable[str] = (), argv: list[str] | None = None,
        options: Mapping[str, dict] | None = None) -> int:
    """Parse `--params`, the stage's input paths and `--out`; validate; run; exit 0, or 2 on bad input."""
    ap = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=(fn.__doc__ or "").strip())
    ap.add_argument("--params", default="params.yaml", help="params file with a %r section" % stage)
    for name in inputs:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    for name, kwargs in (options or {}).items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)
    ap.add_argument("--out", type=Path, required=True, help="stage output folder")
    args = vars(ap.parse_args(argv))
    from lmforge import distributed

    try:
        params = args.pop("params")
        cfg = load_stage(stage, params)
        out = args.pop("out")
        paths = {name: args.pop(name) for name in inputs}
        if not distributed.is_worker():
            launch = load_stage("launch", params)
            if distributed.plan(stage, cfg, launch):  # the command starts the workers and waits for them
                for name, path in paths.items():  # missing inputs: one line here, not N workers' failures
                    require(path, name.replace("_", " "))
                return distributed.launch(stage, list(sys.argv[1:] if argv is None else argv), launch, out)
        metrics = execute(stage, fn, cfg, out, paths, extra=args)
    except (ConfigError, InputError, tracking.Unreachable) as err:
        if distributed.is_main():
            print(tracking.redact(f"error: {stage}: {err}"), file=sys.stderr)
        distributed.report_status(2)
        return 2
    if distributed.is_main():
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=1))
    return 0
