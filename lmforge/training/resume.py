"""Resumable training for the stages that run a transformers/TRL Trainer (sft, lora, reward, dpo, grpo; ppo's
own checkpoints follow the same rules, lmforge.training.ppo_backend).

The stage's command gets `--checkpoints out/<stage>/checkpoints`: scratch, git-ignored and not a DVC output
(an uncached output would leave a clone that pulled from the DVC remote out of date). The Trainer writes its
full state there (model, optimizer, scheduler, RNG, step; the data position follows from the step) every
`checkpoint_every` steps, keeping the last one. A rerun of the same run (`fingerprint`: config, input
weights, training data) continues from that checkpoint; any other run clears the folder and starts fresh;
a finished run clears it too. `Resumable` is that life cycle around one stage's training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from lmforge import distributed

MARK = "fingerprint"
TRAINER_TMP = "_trainer_tmp"  # the Trainer's output_dir inside the staging folder when there is no --checkpoints
OPTION = {"checkpoints": {"type": Path, "default": None, "help": "scratch folder for resumable checkpoints (not an output)"}}


def fingerprint(cfg, models: Iterable[Path], data: Any) -> str:
    """Identifies a training run: a checkpoint is resumed only by the run (config, input weights, data) that wrote it."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    for folder in models:
        for weights in sorted(Path(folder).glob("*.safetensors")):
            with weights.open("rb") as fh:  # the header names every tensor and its offsets; the first MiB samples values
                h.update(fh.read(1 << 20))
            h.update(str(weights.stat().st_size).encode())
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def resume_point(checkpoints: Path | None, fp: str) -> str | None:
    """The last checkpoint in `checkpoints` written by this run, or None (a stale folder is cleared)."""
    from transformers.trainer_utils import get_last_checkpoint

    if checkpoints is None or not checkpoints.is_dir():
        return None
    mark = checkpoints / MARK
    if not mark.is_file() or mark.read_text() != fp:
        if distributed.is_main():  # another config, input or data: its checkpoints cannot continue this run
            shutil.rmtree(checkpoints)
        return None
    return get_last_checkpoint(str(checkpoints))


def start(stage: str, checkpoints: Path | None, fp: str) -> str | None:
    """Before training: the checkpoint to resume from (None: start fresh), said on stderr; the folder is
    marked as this run's, so a crash from here on leaves checkpoints only this run picks up."""
    resume = resume_point(checkpoints, fp)
    if checkpoints is not None and distributed.is_main():
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / MARK).write_text(fp)
    if resume:
        print(f"{stage}: resuming from {resume} (step {step_of(resume)})", file=sys.stderr)
    return resume


def finish(checkpoints: Path | None) -> None:
    """Training done: its checkpoints are no use to a later run (which would only skip training)."""
    if checkpoints is not None and distributed.is_main():
        shutil.rmtree(checkpoints, ignore_errors=True)


def save_args(checkpoints: Path | None, every: int) -> dict:
    """The Trainer arguments that write (or not) the resumable checkpoints."""
    on = checkpoints is not None and every > 0
    # one checkpoint kept: it holds everything a resume needs, and older ones only cost disk
    return {"save_strategy": "steps" if on else "no", "save_steps": max(every, 1), "save_total_limit": 1}


def step_of(checkpoint: str | None) -> int:
    """The optimizer step a Trainer checkpoint (".../checkpoint-<step>") was taken at; 0 for none."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def earlier_logs(checkpoint: str | None) -> list[tuple[int, dict]]:
    """The (step, logs) a resumed run logged before its checkpoint, so its curves, first losses and tracked
    metrics are whole, as an uninterrupted run's are."""
    if not checkpoint:
        return []
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return [(entry["step"], {k: v for k, v in entry.items() if k != "step"}) for entry in state.get("log_history", [])]


class Resumable:
    """One stage's training run, resumable: entering picks the checkpoint to go on from (`start`); `train`
    replays the logs written before it and trains from there, timed; leaving the block normally clears the
    folder (`finish`), while a crash leaves it for the rerun.

        with Resumable("dpo", checkpoints, fingerprint(cfg, [policy], data), out) as run:
            trainer = make_trainer(..., run.work, checkpoints=run.saves)
            result = run.train(trainer.train, ForwardLogs(tracker, history))
    """

    def __init__(self, stage: str, checkpoints: Path | None, fp: str, out: Path):
        self.stage, self.checkpoints, self.fp = stage, checkpoints, fp
        self.saves = checkpoints is not None  # whether the Trainer writes resumable checkpoints
        self.work = checkpoints or out / TRAINER_TMP  # the Trainer's output_dir
        self.checkpoint: str | None = None
        self.seconds = 0.0  # time spent in train()

    @property
    def step(self) -> int:
        """The step this run resumed from; 0 when it started fresh."""
        return step_of(self.checkpoint)

    def __enter__(self) -> "Resumable":
        self.checkpoint = start(self.stage, self.checkpoints, self.fp)
        return self

    def train(self, fn: Callable[..., Any], *logs, **kwargs) -> Any:
        """fn(resume_from_checkpoint=..., **kwargs), after handing the earlier run's logs to each of `logs`
        (callbacks with a `replay`), so curves and first losses are whole, as an uninterrupted run's are."""
        for log in logs:
            log.replay(earlier_logs(self.checkpoint))
        t0 = time.perf_counter()
        result = fn(resume_from_checkpoint=self.checkpoint, **kwargs)
        self.seconds = time.perf_counter() - t0
        return result

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            finish(self.work)  # done: a later run starts fresh
