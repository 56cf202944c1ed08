"""What every row shares: the result record, the sizes, the temporary workspace and timing helpers."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ("tasks", "lmforge", "flows", "configs", "dvc.yaml", "params.yaml")


class BenchError(RuntimeError):
    """A measurement that could not be taken; the row records the message instead of a figure."""


class Skip(Exception):
    """A row that cannot run here (missing stage, package or record); the message says why."""


# ------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    number: str
    key: str
    title: str
    status: str = "ok"  # ok | skipped | error
    ours: float | None = None
    baseline: float | None = None
    unit: str = ""
    baseline_name: str = ""
    value: float | None = None  # the figure compared with the target (a ratio, a difference or a time)
    value_text: str = ""
    target: str = ""
    met: bool | None = None  # None: report only, or not measured
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def fmt(value: float | None, unit: str = "") -> str:
    """Three significant digits, thousands separated, unit appended."""
    if value is None:
        return "–"
    mag = abs(value)
    if mag >= 1000:
        text = f"{value:,.0f}"
    elif mag >= 100:
        text = f"{value:.0f}"
    elif mag >= 10:
        text = f"{value:.1f}"
    elif mag >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def ratio_row(number: str, key: str, title: str, ours: float, baseline: float, unit: str, *, baseline_name: str,
              at_least: float | None = None, at_most: float | None = None, note: str = "", **details) -> Row:
    """ours / baseline against a bound; no bound means the row only reports."""
    ratio = ours / baseline if baseline else None
    target, met = "report", None
    if ratio is not None and at_least is not None:
        target, met = f"≥ {at_least:g}×", ratio >= at_least
    elif ratio is not None and at_most is not None:
        target, met = f"≤ {at_most:g}×", ratio <= at_most
    return Row(number, key, title, ours=ours, baseline=baseline, unit=unit, baseline_name=baseline_name,
               value=ratio, value_text=f"{ratio:.3g}×" if ratio is not None else "–", target=target, met=met,
               note=note, details=details)


def excess_row(number: str, key: str, title: str, ours: float, baseline: float, *, baseline_name: str,
               at_most: float, unit: str = "s", note: str = "", **details) -> Row:
    """ours - baseline (seconds) against a bound."""
    diff = ours - baseline
    return Row(number, key, title, ours=ours, baseline=baseline, unit=unit, baseline_name=baseline_name, value=diff,
               value_text=f"{diff:+.2f} {unit}", target=f"≤ +{at_most:g} {unit}", met=diff <= at_most, note=note,
               details=details)


def limit_row(number: str, key: str, title: str, ours: float, limit: float, *, unit: str = "s", note: str = "",
              **details) -> Row:
    """A figure against a fixed limit (wall time of the lifecycle, of the tests)."""
    return Row(number, key, title, ours=ours, baseline=limit, unit=unit, baseline_name="limit", value=ours / limit,
               value_text=f"{ours / limit:.2f} of limit", target=f"≤ {fmt(limit, unit)}", met=ours <= limit,
               note=note, details=details)


# ------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """How big each measurement is. `quick` checks the machinery; the others are the full sizes (CPU or CUDA)."""

    name: str
    data_preset: str  # preset whose mix + tokenizer sections make the corpus and tokenizer
    pretrain: dict
    pretrain_warm: int  # steps before timing starts (a multiple of log_every)
    pretrain_steps: int  # timed steps (a multiple of log_every)
    repeats: int  # alternating ours/baseline pairs for the training rows; the best of each counts
    matmul_n: int
    matmul_seconds: float
    sft: dict
    sft_warm: int
    sft_steps: int
    ppo: dict
    ppo_warm: int
    ppo_steps: int
    pipeline_stages: tuple[str, ...] | None  # stages the orchestration rows build; None: all in dvc.yaml
    overhead_stages: tuple[str, ...]
    timed_runs: int  # repetitions of each orchestration timing; the fastest counts


_PRETRAIN_COMMON = dict(eval_batches=1, checkpoint_every=1_000_000, sample_tokens=2, sample_prompts=["The "],
                        warmup_steps=2)
_SFT_COMMON = dict(test_examples=8, eval_batch_size=8, max_new_tokens=4, eval_every=0)
_PPO_COMMON = dict(test_prompts=8, eval_batch_size=8, response_length=8)


def sizes_for(quick: bool, cuda: bool) -> Sizes:
    if quick:
        return Sizes(
            name="quick", data_preset="tiny",
            pretrain=dict(_PRETRAIN_COMMON, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                          intermediate_size=192, seq_len=64, batch_size=8, log_every=2),
            pretrain_warm=2, pretrain_steps=6, repeats=1, matmul_n=256, matmul_seconds=0.2,
            sft=dict(_SFT_COMMON, batch_size=8, max_length=128, log_every=1), sft_warm=2, sft_steps=4,
            ppo=dict(_PPO_COMMON, batch_size=4, mini_batches=2, ppo_epochs=1), ppo_warm=1, ppo_steps=2,
            pipeline_stages=("mix", "tokenizer"), overhead_stages=("mix",), timed_runs=1,
        )
    if cuda:  # a ~100M-parameter Llama in bf16 autocast, as the pretrain stage runs it on a GPU
        pretrain = dict(_PRETRAIN_COMMON, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        intermediate_size=2560, seq_len=1024, batch_size=16, log_every=10, dtype="bf16", compile=True)
        warm, steps, matmul_n = 10, 30, 8192
    else:  # the default preset's model at its batch and context
        pretrain = dict(_PRETRAIN_COMMON, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                        intermediate_size=704, seq_len=256, batch_size=16, log_every=5)
        warm, steps, matmul_n = 5, 25, 2048
    return Sizes(
        name="cuda" if cuda else "cpu", data_preset="default", pretrain=pretrain, pretrain_warm=warm,
        pretrain_steps=steps, repeats=2, matmul_n=matmul_n, matmul_seconds=2.0,
        sft=dict(_SFT_COMMON, batch_size=32, max_length=256, log_every=5), sft_warm=5, sft_steps=20,
        ppo=dict(_PPO_COMMON, batch_size=16, mini_batches=2, ppo_epochs=4), ppo_warm=2, ppo_steps=6,
        pipeline_stages=None, overhead_stages=("mix", "tokenizer", "pretrain"), timed_runs=3,
    )


# ---------------------------------------------------------------------------------------- helpers
def stage_module(name: str):
    """A stage's module, or Skip when it is not written yet or does not import."""
    if not (ROOT / "tasks" / f"{name}.py").exists():
        raise Skip(f"tasks/{name}.py does not exist yet")
    try:
        return importlib.import_module(f"tasks.{name}")
    except Exception as err:  # a stage being written may not import yet
        raise Skip(f"tasks.{name} does not import: {err!r}") from err


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_env(**extra: str | None) -> dict[str, str]:
    """The environment for child processes: this interpreter's bin first (stage commands say `python`),
    offline Hugging Face, MLflow's local store; `None` removes a variable."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.pop("MLFLOW_TRACKING_URI", None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cmd(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800,
            cpus: int | None = None) -> tuple[float, str]:
    """Run a command, return (wall seconds, stdout); a failure raises BenchError with the output's tail.
    `cpus` pins the child to that many CPUs (a 2-core machine on a bigger one)."""
    preexec = None
    if cpus and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))[:cpus]
        preexec = lambda: os.sched_setaffinity(0, allowed)  # noqa: E731
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{' '.join(cmd[:4])} … timed out after {timeout:.0f} s") from err
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        failed = BenchError(f"{' '.join(cmd[:5])} … exited {proc.returncode}: " + " | ".join(tail))
        failed.output = proc.stdout  # whole, for a caller that reads a failing command's report
        raise failed
    return seconds, proc.stdout


def best_of(n: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    """The smallest of n timings (the least disturbed by other load), and all of them."""
    times = [fn() for _ in range(max(1, n))]
    return min(times), times


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -------------------------------------------------------------------------------------- workspace
class Context:
    """The temporary workspace a bench run shares between rows: corpus, tokenizer, base model, DVC
    projects and the Prefect server are made on first use and reused."""

    def __init__(self, sizes: Sizes, *, full: bool = False, records: Path = ROOT, workdir: Path | None = None,
                 keep: bool = False):
        import torch

        self.sizes, self.full, self.records, self.keep = sizes, full, Path(records), keep
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmforge-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as err:  # a failed clean-up must not hide the results
                log(f"clean-up: {err!r}")
        self._closers.clear()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ shared inputs
    def data(self) -> tuple[Path, Path]:
        """(corpus, tokenizer dir) made by the mix and tokenizer stages with the data preset."""
        return self.memo("data", self._make_data)

    def set_data(self, corpus: Path, tokenizer: Path) -> None:
        """Use an existing corpus and tokenizer (tests do, to skip the mix stage)."""
        self._cache["data"] = (Path(corpus), Path(tokenizer))

    def _make_data(self) -> tuple[Path, Path]:
        from tasks import mix
        from tasks import tokenizer
        from lmforge.stage import execute
        from lmforge.tracking import NullTracker

        mix_cfg = self.stage_config(self.sizes.data_preset, "mix")
        tok_cfg = self.stage_config(self.sizes.data_preset, "tokenizer")
        out = self.workdir / "data"
        log(f"data: mix + tokenizer stages, preset {self.sizes.data_preset}")
        execute("mix", mix.run, mix_cfg, out / "mix", {}, tracker=NullTracker())
        corpus = out / "mix" / "corpus"
        execute("tokenizer", tokenizer.run, tok_cfg, out / "tokenizer", {"corpus": corpus},
                tracker=NullTracker())
        return corpus, out / "tokenizer" / "tokenizer"

    def stage_config(self, preset: str, stage: str):
        """One section of a preset (typed defaults + configs/<preset>.yaml); only that section is validated."""
        from lmforge.config import parse_section, read_yaml

        path = ROOT / "configs" / f"{preset}.yaml"
        return parse_section(stage, (read_yaml(path) or {}).get(stage) or {}, str(path))

    def project(self, preset: str) -> Path:
        """A throw-away copy of the project (git + DVC initialised, params.yaml from the preset)."""
        return self.memo(f"project:{preset}", lambda: make_project(self.workdir / f"project-{preset}", preset))


def make_project(root: Path, preset: str) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*.staging")
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        else:
            shutil.copy(src, root / name)
    env = base_env()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@lmforge.invalid"],
                ["git", "config", "user.name", "bench"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "lmforge.cli.preset", preset], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench project"]):
        run_cmd(cmd, root, env, timeout=300)
    return root
