"""Calibrated and trained 4-bit weights, run in the compression environment (lmforge.compress makes it): a
standalone script that imports only torch, transformers, torchao and llmcompressor, never lmforge, because
llmcompressor pins an older transformers than lmforge's lock.

    python worker.py SPEC.json

SPEC names the full-precision model folder, the (method, output folder) jobs and the token windows to use
(JSON lines of token ids, written by the caller). Every method writes the same format: int4 symmetric,
per-group scales (`group_size` columns), packed by compressed-tensors (`pack-quantized`), which transformers
loads with the compressed-tensors package and vLLM natively.

- rtn: round-to-nearest, no data (post-training quantisation, the baseline of the other two);
- gptq: GPTQ (llmcompressor's GPTQModifier), each layer's rounding corrected through its inputs' Hessian,
  taken from the calibration windows;
- qat: quantisation-aware training: torchao fake-quantises the linear weights with the very scheme `rtn`
  applies, and the model learns to match its own full-precision outputs (KL between next-token
  distributions) on the training windows; its trained weights are then packed by `rtn`, which lands them
  exactly on the grid the training saw.

Progress goes to stdout as JSON lines: {"step", "loss"} while QAT trains, {"done": method, ...} per job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings


def _quiet() -> None:
    # torchao looks for CUDA extensions at import and says so on a CPU-only machine; llmcompressor logs through
    # loguru at INFO per layer. Neither says anything the caller needs.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def read_windows(path: str) -> list[list[int]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def scheme(group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def pack(model, spec: dict, windows: list[list[int]] | None, gptq: bool) -> None:
    """Quantise `model` in place with llmcompressor (GPTQ from the windows, or round-to-nearest) and save it."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = scheme(spec["group_size"])
    if gptq:
        from datasets import Dataset

        data = Dataset.from_list([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows])
        recipe = GPTQModifier(config_groups=groups, ignore=spec["ignore"], dampening_frac=spec["dampening"],
                              block_size=128)
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=max(len(w) for w in windows),
                num_calibration_samples=len(windows), shuffle_calibration_samples=False)
    else:
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=spec["ignore"]))
    model.save_pretrained(spec["out"], save_compressed=True)


def qat(model, spec: dict, windows: list[list[int]]) -> dict:
    """Fine-tune `model` with fake-quantised linear weights towards its own full-precision outputs."""
    import copy

    import torch
    import torch.nn.functional as F
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    torch.manual_seed(spec["seed"])
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    ignore = set(spec["ignore"])
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=spec["group_size"], is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weight, step="prepare"),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name not in ignore)  # exact names
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    steps, batch = spec["steps"], spec["batch_size"]
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.randperm(len(windows)).tolist()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        picks = [order[(step * batch + i) % len(order)] for i in range(batch)]
        ids = torch.tensor([windows[i] for i in picks])
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        logits = model(input_ids=ids).logits.float()
        loss = F.kl_div(F.log_softmax(logits, dim=-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                        reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % spec["log_every"] == 0 or step == steps - 1:
            emit(step=step, loss=round(losses[-1], 6), lr=sched.get_last_lr()[0])
    for name, module in list(model.named_modules()):  # back to plain Linear layers holding the trained weights
        for child_name, child in list(module.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                setattr(module, child_name, child.to_linear())
    model.eval()
    tenth = max(1, steps // 10)  # KL per batch is noisy: the mean of the first and the last tenth of the steps
    return {"qat_steps": steps, "qat_kl_first": round(sum(losses[:tenth]) / tenth, 6),
            "qat_kl_last": round(sum(losses[-tenth:]) / tenth, 6),
            "qat_s": round(time.perf_counter() - start, 2), "qat_tokens": steps * batch * len(windows[0])}


def main(spec_path: str) -> int:
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(spec.get("num_threads") or torch.get_num_threads())
    for method, out in spec["jobs"]:  # one process for every method: the imports cost more than a small model
        job = {**spec, "method": method, "out": out}
        model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=torch.float32, trust_remote_code=False,
                                                     use_safetensors=True)
        start = time.perf_counter()
        extra: dict = {}
        if method == "qat":
            extra = qat(model, job, read_windows(spec["train"]))
        windows = read_windows(spec["calibration"]) if method == "gptq" else None
        pack(model, job, windows, gptq=method == "gptq")
        emit(done=method, seconds=round(time.perf_counter() - start, 2), **extra)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
