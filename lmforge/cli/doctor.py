"""`make doctor`: what this machine offers and what lmforge will use, on one screen, no stack traces.

    python -m lmforge.cli.doctor

Each line is `name: what was found`, with `-> what lmforge does with it` where that follows. A probe that
fails says why in a few words instead of raising. Exit code 0 unless the Python itself is unsupported.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable

from lmforge.runtime import cpu_flags

SUPPORTED = ((3, 11), (3, 13))  # the Makefile's PY_MIN / PY_MAX


def _try(probe: Callable[[], str]) -> str:
    try:
        return probe()
    except Exception as err:  # noqa: BLE001 - a doctor reports, it does not crash
        return f"unavailable ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"


def cpu_name() -> str:
    """The CPU's model name. psutil has none; py-cpuinfo has, at 1.1 s per call (measured) and a dependency for
    one string, so Linux's /proc/cpuinfo is read here, one line."""
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def _python() -> str:
    v = sys.version_info[:2]
    ok = SUPPORTED[0] <= v <= SUPPORTED[1]
    span = f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]}-{SUPPORTED[1][0]}.{SUPPORTED[1][1]}"
    return f"{platform.python_version()} ({sys.executable}) -> {'supported' if ok else f'NOT supported, use {span}'}"


def _torch() -> str:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return f"{torch.__version__} ({build} build), CPU kernels: {torch.backends.cpu.get_cpu_capability()}"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none -> every stage runs on the CPU in fp32"
    names = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        names.append(f"{p.name} {p.total_memory / 2**30:.0f} GiB")
    bf16 = torch.cuda.is_bf16_supported()
    return f"{', '.join(names)} -> stages with device: auto use cuda{', bf16 autocast' if bf16 else ', fp32 (no bf16)'}"


def _cpu() -> str:
    flags = cpu_flags()
    wanted = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")]
    have = [label for flag, label in wanted if flag in flags]
    lack = [label for flag, label in wanted if flag not in flags]
    import psutil

    me = psutil.Process()
    usable = len(me.cpu_affinity()) if hasattr(me, "cpu_affinity") else psutil.cpu_count()  # macOS: no affinity
    text = (f"{cpu_name()}, {usable} usable core(s) of {psutil.cpu_count()} logical, "
            f"{psutil.cpu_count(logical=False) or '?'} physical")
    return text + f"; has {', '.join(have) or 'none of'}" + (f"; lacks {', '.join(lack)}" if lack else "")


def _memory_disk() -> str:
    import psutil

    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(Path.cwd())
    low = " -> under 5 GiB free: the default run and its DVC cache need a few" if disk.free < 5 * 2**30 else ""
    return f"{mem.total / 2**30:.1f} GiB RAM ({mem.available / 2**30:.1f} free); disk {disk.free / 2**30:.1f} GiB free here{low}"


def _tracking() -> str:
    from lmforge import tracking

    if os.environ.get(tracking.SWITCH_ENV, "").lower() == "off":
        return f"off ({tracking.SWITCH_ENV}=off)"
    uri = tracking.tracking_uri()
    if "@" in uri:  # never print credentials
        scheme, rest = uri.split("://", 1) if "://" in uri else ("", uri)
        uri = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default: a SQLite file in the project"
    return f"{uri} ({source})"


def _bitsandbytes() -> str:
    from importlib.metadata import version

    from lmforge import lowbit

    why = lowbit.available()
    if why:
        return f"does not import ({why[:80]}) -> quantize and QLoRA cannot run"
    import torch

    bf16 = lowbit.cpu_has_avx512bf16()
    four = ("packed AVX512-BF16 kernel for inference (layers whose shape it cannot take: generic path)"
            if bf16 else "generic path (dequantise per matmul; no AVX512-BF16)")
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    eight = "torch._int_mm (AVX-512)" if avx512 else "dequantising fallback (no AVX-512)"
    return f"{version('bitsandbytes')}: CPU 4-bit -> {four}; CPU int8 -> {eight}"


def _launch() -> str:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus else "gloo"
    return f"{max(gpus, 1)} process(es) per node would fit (launch.nproc_per_node), backend {backend}"


def report() -> list[tuple[str, str]]:
    return [
        ("python", _try(_python)),
        ("torch", _try(_torch)),
        ("gpu", _try(_gpu)),
        ("cpu", _try(_cpu)),
        ("memory", _try(_memory_disk)),
        ("bitsandbytes", _try(_bitsandbytes)),
        ("distributed", _try(_launch)),
        ("tracking", _try(_tracking)),
    ]


def main(argv: list[str] | None = None) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    print("lmforge doctor")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if SUPPORTED[0] <= sys.version_info[:2] <= SUPPORTED[1] else 1


if __name__ == "__main__":
    sys.exit(main())
