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
