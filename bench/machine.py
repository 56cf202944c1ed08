"""The machine a bench run measured on, and its dense matmul peak (the denominator of MFU)."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "tokenizers", "trl", "peft", "accelerate", "bitsandbytes", "dvc", "prefect",
            "mlflow", "sentencepiece")


def cpu_model() -> str:
    from lmforge.cli.doctor import cpu_name

    return cpu_name()


def describe() -> dict:
    import torch

    from lmforge.runtime import cpu_flags

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
        "cpu_flags": sorted(cpu_flags()),
        "versions": {},
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for pkg in PACKAGES:
        try:
            info["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            info["versions"][pkg] = None
    return info


def matmul_peak(device: str, n: int, seconds: float = 2.0) -> dict:
    """Dense matmul throughput at size n×n: fp32 on CPU, bf16 on CUDA (the dtypes training runs in).
    Repeated for about `seconds`; the fastest batch of repetitions counts."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    sync()
    reps, best, deadline = 1, float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        elapsed = time.perf_counter() - start
        if elapsed < 0.05:  # too short to time well: more repetitions per timing
            reps *= 2
            continue
        best = min(best, elapsed / reps)
        if time.perf_counter() > deadline:
            break
    return {"flops_per_s": 2 * n**3 / best, "n": n, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}
