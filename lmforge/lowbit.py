"""Low-bit weights through bitsandbytes, in one place: quantisation configs, the CPU kernel's shape rules,
and what the user is told about kernels.

bitsandbytes 0.50 runs a 4-bit layer on a CPU in one of two ways. On a CPU with AVX512-BF16 (Intel
Sapphire Rapids and later, AMD Zen 4 and later) `Linear4bit.forward`, in eval mode without gradients,
repacks the weight once for a fused kernel; that repacking reshapes the per-block scales to
`[out_features, in_features / blocksize]` and tiles the rows by 32, so it breaks on any layer whose
`in_features` is not a multiple of the block size (64) or whose `out_features` is not a multiple of 32.
Elsewhere (other CPUs, training mode) it dequantises per matmul and takes any shape. The flag it reads is
`Linear4bit.support_avx512bf16_for_cpu`, set per layer when the layer is built.

lmforge keeps every low-bit model runnable on both paths:
- `quantize` keeps the layers the packed path cannot take in full precision (the default) and reports
  them, so a saved nf4 folder loads and runs with plain transformers on any CPU or GPU;
- every model lmforge loads goes through `guard_packed_path`, which turns the packed path off for such
  layers (and for all layers while training, where the repacked weight has no gradient path).

LLM.int8() has no shape rule on CPU: with AVX-512 its matmul is `torch._int_mm`, otherwise a dequantising
fallback; both take any shape (tests run both).
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable

BLOCKSIZE_4BIT = 64  # bitsandbytes' 4-bit block size (transformers does not expose another)
PACK_ROWS = 32  # the packed CPU kernel tiles output rows by this many
_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"
_noted: set[str] = set()


class _DropKernelWarning(logging.Filter):
    """bitsandbytes logs a warning with a stack of advice at import on AVX512-BF16 CPUs, in every process
    that imports it (PEFT and TRL import it even where no 4-bit layer is used). `kernel_note` says it
    once, in plain words, where it matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _KERNEL_WARNING not in str(record.msg)


def quiet() -> None:
    """Silence bitsandbytes' import-time kernel warning and its per-call int8 cast notice. Cheap: no import."""
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelWarning) for f in ops.filters):
        ops.addFilter(_DropKernelWarning())
    # "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on every int8 matmul
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def available() -> str | None:
    """None when bitsandbytes imports, else why not (one line)."""
    quiet()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        return f"{type(err).__name__}: {err}"
    return None


def cpu_has_avx512bf16() -> bool:
    """What bitsandbytes itself reads to pick its 4-bit CPU path (False when it is not installed)."""
    if available() is not None:
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def packable(out_features: int, in_features: int, blocksize: int = BLOCKSIZE_4BIT) -> bool:
    """Whether bitsandbytes' packed AVX512-BF16 CPU kernel can take a [out_features, in_features] weight."""
    return out_features % PACK_ROWS == 0 and in_features % blocksize == 0 and in_features % 2 == 0


def skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether a module name is one of `skip` (a full name, or a name suffix after a dot)."""
    return any(name == s or name.endswith("." + s) for s in skip)


def resolve_skips(model, skip: Iterable[str]) -> list[str]:
    """The exact names of the model's modules that `skip` names (in full or as a suffix): what every quantiser
    here is given, since each matches names its own way (bitsandbytes by substring, llmcompressor exactly)."""
    return [name for name, _ in model.named_modules() if name and skipped(name, skip)]


def unpackable_linears(model, skip: Iterable[str] = ()) -> list[str]:
    """Names of the model's nn.Linear layers that 4-bit quantisation would convert but the packed CPU
    kernel cannot run; `skip` holds names (or name suffixes) that stay in full precision anyway."""
    import torch

    skip = tuple(skip)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or skipped(name, skip):
            continue
        if not packable(module.out_features, module.in_features):
            names.append(name)
    return names


def guard_packed_path(model, training: bool = False) -> list[str]:
    """Turn bitsandbytes' packed CPU path off for 4-bit layers that cannot take it (all of them when
    `training`); returns the names of the layers changed. A no-op for models without 4-bit layers."""
    changed = []
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        shape = getattr(module.weight, "quant_state", None)
        out_f, in_f = (shape.shape if shape is not None else (module.out_features, module.in_features))
        blocksize = getattr(shape, "blocksize", BLOCKSIZE_4BIT) if shape is not None else BLOCKSIZE_4BIT
        if training or not packable(int(out_f), int(in_f), int(blocksize)):
            module.support_avx512bf16_for_cpu = False
            changed.append(name)
    return changed


def count_layers(model) -> dict[str, int]:
    """How many linear layers are int8, 4-bit or left in full precision."""
    import torch

    counts = {"int8": 0, "4bit": 0, "full": 0}
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear8bitLt":
            counts["int8"] += 1
        elif kind == "Linear4bit" or hasattr(module, "weight_packed"):  # bitsandbytes, compressed-tensors int4
            counts["4bit"] += 1
        elif isinstance(module, torch.nn.Linear):
            counts["full"] += 1
    return counts


def kernel_note(device_type: str) -> str | None:
    """One plain line, once per process, about the 4-bit CPU kernel this machine gets; None on GPU."""
    if device_type != "cpu" or "4bit-cpu" in _noted:
        return None
    _noted.add("4bit-cpu")
    if cpu_has_avx512bf16():
        try:
            import kernels  # noqa: F401  - the optional faster kernel comes through this package
            return None
        except ImportError:
            note = ("note: this CPU has AVX512-BF16; 4-bit layers use bitsandbytes' built-in bf16 kernel "
                    "(the faster kernels-community one needs `pip install kernels` and a download)")
    else:
        note = ("note: this CPU has no AVX512-BF16, so 4-bit layers dequantise their weights on every matmul "
                "(slower than fp32 here; memory is what 4 bits save)")
    print(note, file=sys.stderr)
    return note


def bnb_config(method: str, *, skip: list[str] | None, compute_dtype: str = "fp32", double_quant: bool = True,
               int8_threshold: float = 6.0):
    """transformers' BitsAndBytesConfig for `int8` (LLM.int8()) or `nf4`; `skip` None = transformers' default
    (the output head)."""
    import torch
    from transformers import BitsAndBytesConfig

    quiet()
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold, llm_int8_skip_modules=skip)
    if method != "nf4":
        raise ValueError(f"unknown low-bit method {method!r}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip,
    )
