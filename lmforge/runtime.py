"""Where a stage runs: the device it picks and the CPU threads torch uses. Shared by every training and
measuring stage, so `device: auto|cpu|cuda` means the same thing everywhere."""

from __future__ import annotations

from lmforge.errors import InputError


def pick_device(choice: str, stage: str = "", num_threads: int = 0):
    """torch.device for `auto` (cuda when present), `cpu` or `cuda`; sets torch's CPU threads when asked."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    if choice == "cuda" and not torch.cuda.is_available():
        where = f"{stage}.device" if stage else "device"
        raise InputError(f"{where} is 'cuda' but torch sees no CUDA device (use device: auto or cpu)")
    if choice not in ("auto", "cpu", "cuda"):
        raise InputError(f"device {choice!r}: use auto, cpu or cuda")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        import os

        # under torchrun/accelerate each process takes the GPU of its local rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def user_cache():
    """lmforge's folder in the user's cache (XDG_CACHE_HOME, else ~/.cache): what is built or converted once per
    machine (the compression environment, dequantised GGUF files)."""
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def kept_cache():
    """Where lmforge keeps what it computes once and reads back (GGUF conversions, starting-policy figures):
    LMFORGE_CACHE when set, else the user's cache."""
    import os
    from pathlib import Path

    return Path(os.environ["LMFORGE_CACHE"]) if os.environ.get("LMFORGE_CACHE") else user_cache()


def cpu_flags() -> set[str]:
    """The instruction sets torch's own CPU dispatch detects (what lmforge's kernels can use), as /proc names."""
    import torch

    probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}


def native_bf16(device) -> bool:
    """Whether bf16 matmuls run natively here: any CUDA device, or a CPU with AVX512-BF16 or AMX (elsewhere bf16
    is emulated and slower than fp32)."""
    return device.type == "cuda" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
