"""4-bit weights by the methods the field compares (round-to-nearest, GPTQ, quantisation-aware training), run
in their own environment and handed back as compressed-tensors folders that transformers (with the
compressed-tensors package) and vLLM load.

llmcompressor 0.14 pins transformers <= 5.17 and lmforge's lock has a newer one, so the methods run in an
environment of their own (lmforge/compress/constraints.txt: llmcompressor, torchao, the same torch), built here the
first time a method needs it, in the user's cache (one per set of pins, shared by every checkout and test
project); lmforge/compress/worker.py is the script it runs there. This module prepares the
worker's inputs (token windows from the mix corpus), runs it with a progress bar, and returns its figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from lmforge.data.corpus import iter_texts, source_names
from lmforge.errors import InputError

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"
WORKER = HERE / "worker.py"
PYTHON_ENV = "LMFORGE_COMPRESS_PYTHON"  # a Python that already has llmcompressor and torchao (skips the build)
ENV_DIR = "LMFORGE_COMPRESS_ENV"  # where to build the environment instead of the user's cache
PACKAGES = ("torch==2.13.0", "torchao", "llmcompressor")
METHODS = ("rtn", "gptq", "qat")


class CompressError(RuntimeError):
    """The compression environment could not be built or the worker failed; the message says which and why."""


def _stamp() -> str:
    return hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:16]


def env_dir() -> Path:
    """Where the environment lives: LMFORGE_COMPRESS_ENV, else the user's cache, named by the pins' hash."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    from lmforge.runtime import user_cache

    return user_cache() / f"compress-{_stamp()}"


def python() -> Path:
    """The compression environment's interpreter, built once (locked against a concurrent build)."""
    if os.environ.get(PYTHON_ENV):
        return Path(os.environ[PYTHON_ENV])
    env = env_dir()
    exe, stamp = env / "bin" / "python", env / ".installed"
    if stamp.exists() and stamp.read_text() == _stamp() and exe.exists():
        return exe
    from filelock import FileLock

    env.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env) + ".lock"):
        if stamp.exists() and stamp.read_text() == _stamp() and exe.exists():
            return exe
        print(f"compress: building {env} (llmcompressor, torchao; once, about a minute)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        uv = Path(sys.executable).parent / "uv"
        links = ["--find-links", os.environ["PIP_FIND_LINKS"]] if os.environ.get("PIP_FIND_LINKS") else []
        cmd = ([str(uv), "pip", "install", "-q", "--python", str(exe), *links] if uv.exists()
               else [str(exe), "-m", "pip", "install", "-q"]) + ["-c", str(CONSTRAINTS), *PACKAGES]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise CompressError(f"could not build {env} (needs the package registry): {' '.join(cmd)}: {' | '.join(tail)}")
        stamp.write_text(_stamp())
    return exe


def windows(corpus: Path, tokenizer, split: str, seq_len: int, count: int) -> list[list[int]]:
    """`count` windows of `seq_len` tokens from a corpus split, sources taking turns document by document
    (every source represented however few windows are asked for)."""
    streams = [iter_texts(corpus, split, s) for s in source_names(corpus, split)]
    if not streams:
        raise InputError(f"{corpus}/{split}: no sources to take {split} windows from (run the mix stage)")
    out, buffer = [], []
    while len(out) < count and streams:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
                continue
            buffer += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
            while len(buffer) >= seq_len and len(out) < count:
                out.append(buffer[:seq_len])
                buffer = buffer[seq_len:]
    if not out:
        raise InputError(f"{corpus}/{split}: too little text for one window of {seq_len} tokens")
    return out


def _write_lines(path: Path, rows: Iterable) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def run(jobs: dict[str, Path], source: Path, *, group_size: int, ignore: list[str], seed: int,
        calibration: list[list[int]] | None = None, train: list[list[int]] | None = None, qat: dict | None = None,
        dampening: float = 0.01, num_threads: int = 0, on_step=None) -> dict[str, dict]:
    """Write `source` (a full-precision model folder) as int4 compressed-tensors into each of `jobs`
    ({method: folder}); returns the worker's figures per method. `on_step(step, loss)` gets QAT's progress."""
    from tqdm import tqdm

    unknown = sorted(set(jobs) - set(METHODS))
    if unknown:
        raise InputError(f"unknown 4-bit method(s) {unknown}; choose among {', '.join(METHODS)}")
    if "gptq" in jobs and not calibration:
        raise InputError("gptq needs calibration windows")
    if "qat" in jobs and not (train and qat):
        raise InputError("qat needs training windows and its settings")
    exe = python()
    with tempfile.TemporaryDirectory(prefix="lmforge-compress-") as tmp:
        tmp = Path(tmp)
        spec = {"source": str(source), "jobs": [[m, str(folder)] for m, folder in jobs.items()],
                "group_size": group_size, "ignore": list(ignore), "dampening": dampening, "seed": seed,
                "num_threads": num_threads, **(qat or {})}
        if calibration:
            spec["calibration"] = str(_write_lines(tmp / "calibration.jsonl", calibration))
        if train:
            spec["train"] = str(_write_lines(tmp / "train.jsonl", train))
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "LLM_COMPRESSOR_LOG_LEVEL": "WARNING", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        if not os.environ.get(PYTHON_ENV):  # lmforge's own environment: the first worker leaves the bytecode of
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # what it imports, so later starts take 7 s instead of 15 (AVX2)
        log = (tmp / "stderr.txt").open("w")  # a file, not a pipe: the libraries' progress bars would fill a pipe
        proc = subprocess.Popen([str(exe), str(WORKER), str(tmp / "spec.json")], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        results: dict[str, dict] = {}
        steps = (qat or {}).get("steps") if "qat" in jobs else None
        with tqdm(total=steps, desc="quantize: qat", unit="step", file=sys.stderr, mininterval=1.0,
                  disable=steps is None) as bar:
            for line in proc.stdout:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a library's own print
                if "step" in record:
                    if bar.n == 0:  # the clock starts with training, not with rtn and gptq before it
                        bar.reset(total=steps)
                    bar.update(record["step"] + 1 - bar.n)
                    bar.set_postfix(kl=record["loss"])
                    if on_step:
                        on_step(record["step"], record["loss"])
                elif "done" in record:
                    results[record.pop("done")] = record
        proc.wait()
        log.close()
        stderr = (tmp / "stderr.txt").read_text(errors="replace")
        if proc.returncode != 0 or set(results) != set(jobs):
            tail = " | ".join(stderr.strip().splitlines()[-4:])
            raise CompressError(f"{', '.join(sorted(set(jobs) - set(results)))} of {source} failed in {exe}: "
                                f"{tail or 'no output'}")
    return results
