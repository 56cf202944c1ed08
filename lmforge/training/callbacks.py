"""How transformers/TRL trainers' logs reach lmforge's tracker: trainer callbacks shared by the training stages."""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback


def numbers(logs: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a log, keys prefixed."""
    return {prefix + k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class OnLog(TrainerCallback):
    """Hands each log of a trainer and its step to `fn`."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:  # one process reports; the others hold the same figures
            self.fn(state.global_step, dict(logs))

    def replay(self, earlier: list[tuple[int, dict]]) -> None:
        """Logs of the run a resume continues (lmforge.training.resume.earlier_logs), as if logged now."""
        for step, logs in earlier:
            self.fn(step, dict(logs))


class ForwardLogs(TrainerCallback):
    """Trainer logs -> the stage's tracker (train/..., eval/...) and a local history."""

    def __init__(self, tracker, history: list[dict]):
        self.tracker, self.history = tracker, history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.record(state.global_step, logs or {})

    def record(self, step: int, logs: dict) -> None:
        values = {k: v for k, v in numbers(logs).items() if not k.startswith("train_")}  # train_* = end summary
        if not values:
            return
        named = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in values.items()}
        self.tracker.log_metrics(named, step=step)
        self.history.append({"step": step, **named})

    def replay(self, earlier: list[tuple[int, dict]]) -> None:
        """Logs of the run a resume continues (lmforge.training.resume.earlier_logs), as if logged now."""
        for step, logs in earlier:
            self.record(step, logs)
