"""quantize: low-bit variants of the chosen policy, by the methods the field compares, and what each costs.

Writes one folder per method, each a plain HF model dir whose config.json carries its `quantization_config`,
so `AutoModelForCausalLM.from_pretrained(dir)` loads it quantised with no extra argument:
- post-training, no data (bitsandbytes must be installed to load): `int8` (LLM.int8()), `nf4` (4-bit NormalFloat);
- int4 with per-group scales as compressed-tensors (the package must be installed; vLLM loads them too), made
  by lmforge/compress: `rtn` (round-to-nearest, no data), `gptq` (calibrated on train-split windows) and
  `qat` (quantisation-aware training towards the policy's own outputs, then packed like rtn). rtn, gptq and
  qat share one format and grid, so their differences are the methods' alone. Every variant, the
fp32 source included, is measured the same way: weight bytes on disk, memory footprint, perplexity
on the same held-out tokens, and greedy generation speed on the current device. `tradeoff.csv`
holds the figures and their ratios to fp32 for plots.

bitsandbytes >= 0.46 runs both methods on CPU. There int8 is slower than fp32 (activations are
cast to fp16 and quantised per call); nf4 dequantises to `compute_dtype` and stays close. On CPUs with
AVX512-BF16 bitsandbytes runs 4-bit layers through a packed kernel that only takes some shapes
(lmforge/lowbit.py); by default (`nf4_unpackable: keep`) the layers it cannot take stay in full precision,
named in the folder's lmforge.json and counted in the metrics, so every saved folder runs everywhere.
"""

from __future__ import annotations

import csv
import gc
import math
import sys
import time
from pathlib import Path

from lmforge import compress, lowbit
from lmforge.config import POLICIES, QuantizeConfig
from lmforge.data.corpus import iter_texts, source_names
from lmforge.models import NOT_WRITTEN, check_model_dir, is_quantized, load_causal_lm, weight_bytes
from lmforge.runtime import pick_device
from lmforge.errors import InputError
from lmforge.stage import META_FILE, cli, read_json, write_meta

# each policy stage's held-out exact match on the same test items (posttrain_data's test split, same seed)
SELECT_KEYS = {"sft": "final_accuracy", "lora": "final_accuracy", "ppo": "gt_accuracy", "dpo": "gt_accuracy",
               "grpo": "gt_accuracy"}

BITS = {"fp32": 32, "int8": 8, "nf4": 4, "rtn": 4, "gptq": 4, "qat": 4}
BNB = ("int8", "nf4")  # bitsandbytes; the others are lmforge.compress's int4 methods
CSV_FIELDS = ("variant", "bits", "size_bytes", "memory_footprint_bytes", "perplexity", "tokens_per_s",
              "size_ratio", "footprint_ratio", "ppl_ratio", "speed_ratio")


# ----------------------------------------------------------------------------------- measurements
def heldout_tokens(corpus: Path, tokenizer, n_tokens: int):
    """Up to n_tokens val-split tokens, an equal share per source, documents joined by eos."""
    import torch

    sources = source_names(corpus, "val")
    if not sources:
        raise InputError(f"{corpus}: the val split has no sources (run the mix stage)")
    share = math.ceil(n_tokens / len(sources))
    ids: list[int] = []
    for source in sources:
        taken: list[int] = []
        for text in iter_texts(corpus, "val", source):
            taken += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(taken) >= share:
                break
        ids += taken[:share]
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, tokens, seq_len: int, batch_size: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the token stream."""
    import torch
    import torch.nn.functional as F

    n = max(1, (len(tokens) - 1) // seq_len)
    windows = [tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = torch.nn.utils.rnn.pad_sequence(windows[i : i + batch_size], batch_first=True, padding_value=-100)
            inputs, labels = batch[:, :-1].clamp(min=0).to(device), batch[:, 1:].to(device)
            logits = model(input_ids=inputs).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return math.exp(total / count)


def generation_speed(model, tokenizer, prompt: str, new_tokens: int, repeats: int) -> float:
    """Greedy tokens per second for exactly `new_tokens` tokens; best of `repeats` after a warm-up."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    ids = ids.to(device)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))

    def once(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, min_new_tokens=n, max_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - start

    once(2)  # warm-up: first calls pay for lazy init (bnb kernels, allocator)
    return new_tokens / min(once(new_tokens) for _ in range(repeats))


def measure(model, model_dir: Path, tokenizer, tokens, cfg: QuantizeConfig) -> dict:
    seq_len = int(getattr(model.config, "max_position_embeddings", 256) or 256)
    return {
        "size_bytes": weight_bytes(model_dir),
        "memory_footprint_bytes": int(model.get_memory_footprint()),
        "perplexity": round(perplexity(model, tokens, seq_len, cfg.batch_size), 4),
        "tokens_per_s": round(generation_speed(model, tokenizer, cfg.gen_prompt, cfg.gen_tokens, cfg.gen_repeats), 2),
    }


def plan_skips(model, method: str, cfg: QuantizeConfig) -> tuple[list[str], list[str]]:
    """(modules kept in full precision, of which those kept only because bitsandbytes' packed AVX512-BF16 CPU
    kernel cannot take their shape). int8 has no such rule; nf4 follows quantize.nf4_unpackable."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = lowbit.resolve_skips(model, list(cfg.skip_modules) or get_keys_to_not_convert(model))  # default: the head
    if method != "nf4" or cfg.nf4_unpackable == "quantize":  # int8 and the int4 methods take any shape
        return skip, []
    odd = lowbit.unpackable_linears(model, skip)
    return skip + odd, odd


def lowbit_share(model, skip: list[str]) -> float:
    """Share of the model's (unique) parameters that sit in low-bit linear layers."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    low = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and not lowbit.skipped(n, skip))
    return round(low / total, 4)


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_tradeoff(path: Path, rows: dict[str, dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for variant, m in rows.items():
            writer.writerow({"variant": variant, **{k: m.get(k) for k in CSV_FIELDS[1:]}})


def int4_variants(cfg: QuantizeConfig, source: Path, out: Path, tokenizer, corpus: Path, window: int,
                  skip: list[str], tracker) -> dict[str, dict]:
    """rtn, gptq and qat folders (those in quantize.methods) in one run of lmforge.compress; {method: figures}.
    Calibration and training windows come from the train split, so the held-out text that measures every
    variant stays unseen by all of them."""
    jobs = {m: out / m for m in cfg.methods if m in compress.METHODS}
    if not jobs:
        return {}
    calibration = compress.windows(corpus, tokenizer, "train", window, cfg.gptq_windows) if "gptq" in jobs else None
    train = (compress.windows(corpus, tokenizer, "train", window, cfg.qat_steps * cfg.qat_batch_size)
             if "qat" in jobs else None)
    qat = {"steps": cfg.qat_steps, "batch_size": cfg.qat_batch_size, "lr": cfg.qat_lr,
           "log_every": max(1, cfg.qat_steps // 20)}
    figures = compress.run(jobs, source, group_size=cfg.int4_group_size, ignore=skip,
                           seed=cfg.qat_seed, calibration=calibration, train=train, qat=qat,
                           dampening=cfg.gptq_dampening, num_threads=cfg.num_threads,
                           on_step=lambda step, kl: tracker.log_metrics({"qat_kl": kl}, step=step))
    for folder in jobs.values():
        tokenizer.save_pretrained(folder)
    return figures


# ------------------------------------------------------------------------------------------ choice
def choose_policy(wanted: str, policies: dict[str, Path | None]) -> tuple[str, dict[str, float]]:
    """The policy to quantise: `wanted` by name, or for "best" the highest held-out exact match that each policy
    stage wrote beside its model (ties go to the earlier stage). Returns (name, every candidate's score)."""
    given = {name: Path(path) for name, path in policies.items() if path is not None}
    if wanted != "best":
        if wanted not in given:
            raise InputError(f"quantize.model is {wanted!r} but no --{wanted} folder was given")
        return wanted, {}
    scores = {}
    for name in POLICIES:
        if name not in given:
            continue
        meta = check_model_dir(given[name], f"{name} policy") / META_FILE
        value = read_json(meta).get("metrics", {}).get(SELECT_KEYS[name]) if meta.exists() else None
        if not isinstance(value, (int, float)):
            raise InputError(f"{meta}: no metrics.{SELECT_KEYS[name]} to rank the {name} policy by "
                             "(quantize.model: best; name a policy instead to skip the ranking)")
        scores[name] = float(value)
    if not scores:
        raise InputError("quantize.model is best but no policy folder was given (--sft, --lora, --ppo, --dpo, --grpo)")
    return max(scores, key=lambda n: (scores[n], -POLICIES.index(n))), scores


def run_chosen(cfg: QuantizeConfig, *, corpus: Path, out: Path, tracker, **policies: Path | None) -> dict:
    """Pick the policy (quantize.model), then quantise it; the metrics name the choice and its grounds."""
    name, scores = choose_policy(cfg.model, policies)
    print(f"quantize: policy {name}" + (f" (held-out exact match {scores})" if scores else ""), file=sys.stderr)
    tracker.log_params({"policy_chosen": name})
    metrics = run(cfg, model=Path(policies[name]), corpus=corpus, out=out, tracker=tracker)
    return {"policy": name, "policy_scores": scores, **metrics}


# -------------------------------------------------------------------------------------------- stage
def run(cfg: QuantizeConfig, *, model: Path, corpus: Path, out: Path, tracker) -> dict:
    """Write the policy's low-bit variants (quantize.methods); measure size, memory, perplexity and speed."""
    import json

    import torch
    from transformers import AutoTokenizer

    source = check_model_dir(model, "model to quantise")
    if json.loads((source / "config.json").read_text()).get("quantization_config"):
        raise InputError(f"{source}/config.json: the model is already quantised; pass a full-precision model")
    device = pick_device(cfg.device, "quantize", cfg.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    tokens = heldout_tokens(corpus, tokenizer, cfg.ppl_tokens)
    if len(tokens) < 2:
        raise InputError(f"{corpus}/val: too little text for a perplexity measurement")
    inputs = {"model": model, "corpus": corpus}

    metrics: dict[str, dict] = {}
    fp32 = load_causal_lm(source, device, dtype=torch.float32)
    metrics["fp32"] = {"bits": 32, **measure(fp32, source, tokenizer, tokens, cfg)}
    context = int(getattr(fp32.config, "max_position_embeddings", 0) or cfg.window_tokens)
    plans = {method: plan_skips(fp32, method, cfg) for method in cfg.methods}
    shares = {method: lowbit_share(fp32, plans[method][0]) for method in cfg.methods}
    int4_skip = plan_skips(fp32, "rtn", cfg)[0]  # rtn, gptq and qat keep the same modules in full precision
    if any(m in compress.METHODS for m in cfg.methods):
        uneven = [n for n, mod in fp32.named_modules() if isinstance(mod, torch.nn.Linear)
                  and n not in int4_skip and mod.in_features % cfg.int4_group_size]
        if uneven:
            raise InputError(f"int4_group_size {cfg.int4_group_size} does not divide the input width of "
                             f"{', '.join(uneven[:3])}{', ...' if len(uneven) > 3 else ''}; pick a divisor of every "
                             "width, or leave rtn/gptq/qat out of quantize.methods")
    _free(fp32)
    print(f"quantize: fp32 {metrics['fp32']}", file=sys.stderr)
    for method, (_, odd) in plans.items():
        if odd and shares[method] == 0:
            raise InputError(
                f"quantize: no linear layer of {source} fits bitsandbytes' packed 4-bit CPU kernel (in_features a "
                f"multiple of {lowbit.BLOCKSIZE_4BIT}, out_features of {lowbit.PACK_ROWS}); set quantize.nf4_unpackable: "
                "quantize, or give the model such widths (pretrain.hidden_size, intermediate_size)")
        if odd:
            print(f"quantize: {method}: {len(odd)} layer(s) stay in full precision, their shape does not fit "
                  f"bitsandbytes' packed AVX512-BF16 CPU kernel ({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}; "
                  "quantize.nf4_unpackable: quantize converts them anyway)", file=sys.stderr)

    built = {m: 0.0 for m in cfg.methods}
    for method in [m for m in cfg.methods if m in BNB]:
        start = time.perf_counter()
        skip, odd = plans[method]
        qconfig = lowbit.bnb_config(method, skip=skip, compute_dtype=cfg.compute_dtype, double_quant=cfg.double_quant,
                                    int8_threshold=cfg.int8_threshold)
        quantized = load_causal_lm(source, device, dtype=torch.float32, quantization_config=qconfig)
        quantized.save_pretrained(out / method)
        tokenizer.save_pretrained(out / method)
        _free(quantized)
        built[method] = time.perf_counter() - start
    extra = int4_variants(cfg, source, out, tokenizer, corpus, min(cfg.window_tokens, context), int4_skip, tracker)
    for method, figures in extra.items():
        built[method] = figures.pop("seconds")

    for method in cfg.methods:
        skip, odd = plans[method]
        target = out / method
        # measure what was saved: the folder must load quantised with no extra argument
        reloaded = load_causal_lm(target, device)
        if not is_quantized(reloaded):
            raise RuntimeError(f"{target} reloaded with no low-bit layers; its quantization_config was not applied")
        layers = lowbit.count_layers(reloaded)
        m = {"bits": BITS[method], **measure(reloaded, target, tokenizer, tokens, cfg),
             "quantize_s": round(built[method], 2), "lowbit_layers": layers["int8"] + layers["4bit"],
             "full_precision_layers": layers["full"], "kept_for_cpu_kernel": len(odd),
             "lowbit_param_share": shares[method], **extra.get(method, {})}
        _free(reloaded)
        metrics[method] = m
        print(f"quantize: {method} {m}", file=sys.stderr)

    base = metrics["fp32"]
    for m in metrics.values():
        m["size_ratio"] = round(m["size_bytes"] / base["size_bytes"], 4)
        m["footprint_ratio"] = round(m["memory_footprint_bytes"] / base["memory_footprint_bytes"], 4)
        m["ppl_ratio"] = round(m["perplexity"] / base["perplexity"], 4)
        m["speed_ratio"] = round(m["tokens_per_s"] / base["tokens_per_s"], 4)
    for baseline in ("rtn", "nf4"):  # what a method keeps of the loss of post-training rounding at 4 bits
        lost = math.log(metrics[baseline]["perplexity"] / base["perplexity"]) if baseline in metrics else 0.0
        for method in ("gptq", "qat"):
            if method in metrics and lost > 0:
                own = math.log(metrics[method]["perplexity"] / base["perplexity"])
                metrics[method][f"loss_vs_{baseline}"] = round(own / lost, 4)
    for method in cfg.methods:
        write_meta(out / method, "quantize", cfg, metrics[method], inputs, method=method, device=device.type,
                   heldout_tokens=len(tokens), full_precision_modules=plans[method][0],
                   kept_for_cpu_kernel=plans[method][1])
    for method in [m for m in BITS if m != "fp32" and m not in cfg.methods]:
        # dvc.yaml declares both folders: a left-out method gets a marker in place of its old (now stale) model,
        # and loaders (lmforge/models.py) refuse the folder in one line that says why
        (out / method).mkdir()
        (out / method / NOT_WRITTEN).write_text(f"quantize.methods left out {method} (quantize.methods: "
                                                f"{list(cfg.methods)}); drop {method} from evaluate.variants\n")
    write_tradeoff(out / "tradeoff.csv", metrics)
    tracker.log_artifact(out / "tradeoff.csv")
    return {**metrics, "heldout_tokens": len(tokens), "device": device.type}


def main(argv: list[str] | None = None) -> int:
    options = {name: {"type": Path, "default": None, "help": f"the {name} policy folder"} for name in POLICIES}
    return cli("quantize", run_chosen, inputs=("corpus",), options=options, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
