"""One loaded chat model that answers conversations: what `python -m lmforge.cli.serve` (an OpenAI-compatible API)
and `python -m lmforge.cli.chat` (a terminal chat) share. It renders the model's own chat template, refuses a
conversation that does not fit the model's context, stops where the template ends a turn, and generates one request
at a time on one thread of its own (a CPU is busy with one; a queue of requests waits its turn, none is dropped; and
torch keeps one warm thread pool, where a web server's many threads would each start their own).

The model is a folder (a stage's `out/<stage>/model`) or a registry URI (`models:/lmforge@champion`, read from the
MLflow store lmforge tracks to: the embedded one, or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge import chat
from lmforge.errors import InputError


def from_params(params: str | Path, model: str | None = None):
    """(the `serve` section of `params`, an Engine for `model` or serve.model on serve.device): what the serve and
    chat commands start from. A bad section is a ConfigError; a model that does not load (no such folder, version
    or store) an InputError naming it, so a command prints one line, not a traceback."""
    from lmforge.config import load_stage
    from lmforge.runtime import pick_device

    cfg = load_stage("serve", params)
    device = pick_device(cfg.device, "serve")
    try:
        return cfg, Engine(model or cfg.model, device=str(device))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever loading raised, said in one line
        raise InputError(f"cannot load {model or cfg.model}: {type(err).__name__}: {err}") from err


class TooLong(InputError):
    """The conversation and the tokens asked for do not fit the model's context."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model ended its turn; "length": max_tokens ran out


def resolve(source: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a folder or a `models:/` URI (downloaded from the registry)."""
    if source.startswith("models:/"):
        import mlflow

        from lmforge import tracking

        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking.tracking_uri()))
        if (folder / "model").is_dir():  # an MLflow transformers model: weights and tokenizer in two folders
            return folder / "model", folder / "components" / "tokenizer"
        return folder, folder
    folder = Path(source)
    if not (folder / "config.json").exists():
        raise InputError(f"{source}: not a model folder (no config.json) and not a models:/ URI")
    return folder, folder


class Engine:
    def __init__(self, source: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir, tokenizer_dir = resolve(source)
        self.name = source
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
        if not self.tokenizer.chat_template:
            raise InputError(f"{source}: the tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval().to(device)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.stops = sorted({chat.end_token_id(self.tokenizer), self.tokenizer.eos_token_id} - {None})
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lmforge-generate")  # every generate runs here

    def prompt(self, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
        """The rendered conversation's token ids and the new tokens it may have; TooLong when it does not fit."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        room = self.context - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise TooLong(f"this model's context is {self.context} tokens: the conversation takes {len(ids)} and "
                          f"{max_tokens or 1} more were asked for")
        return ids, min(max_tokens or room, room)

    def _kwargs(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        return {"input_ids": torch.tensor([ids], device=self.model.device), "max_new_tokens": max_tokens,
                "do_sample": sample, "eos_token_id": self.stops, "pad_token_id": self.tokenizer.pad_token_id,
                **({"temperature": temperature, "top_p": top_p} if sample else {"temperature": None, "top_p": None,
                                                                                 "top_k": None})}

    def reply(self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None) -> Reply:
        import torch

        ids, budget = self.prompt(messages, max_tokens)
        kwargs = self._kwargs(ids, budget, temperature, top_p, seed)
        out = self._worker.submit(torch.no_grad()(self.model.generate), **kwargs).result()[0, len(ids):].tolist()
        ended = bool(out) and out[-1] in self.stops
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Reply(text, len(ids), len(out), "stop" if ended else "length")

    def stream(self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """The reply's text piece by piece as it is generated (checked for fit before the first piece). Generation
        stops at the next token once `cancel` is set, or once the returned iterator is closed or dropped: a reader
        who goes away (a client that disconnects mid-stream) does not hold the model."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids, budget = self.prompt(messages, max_tokens)
        cancel = cancel or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failed: list[BaseException] = []

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def generate() -> None:  # on the engine's thread, after the requests before it
            try:
                with torch.no_grad():
                    if not cancel.is_set():
                        self.model.generate(**self._kwargs(ids, budget, temperature, top_p, seed), streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([Cancelled()]))
            except BaseException as err:  # noqa: BLE001 - handed to the reader, who would otherwise wait forever
                failed.append(err)
            finally:
                streamer.end()

        def pieces() -> Iterator[str]:
            done = self._worker.submit(generate)
            try:
                yield from (piece for piece in streamer if piece)
            finally:
                cancel.set()
            done.result()
            if failed:
                raise failed[0]

        return pieces()
