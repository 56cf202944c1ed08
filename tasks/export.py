"""Stage `export`: the policy the quantize stage chose (LoRA already merged) as files a local-inference user runs:

    <out>/gguf/lmforge-<type>.gguf   one per export.types (f16 and q8_0 by default): llama.cpp, Ollama, LM Studio
    <out>/Modelfile             Ollama: the q8_0 file (else the last type), its chat template and stop tokens
    <out>/README.md             the model card: metadata block, data, the evaluation with intervals, how to run it

Each file is read back with transformers' GGUF reader and its logits compared with the safetensors model's on
held-out conversations (export.verify): the figures are in metrics.json and the card.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge import gguf_export, modelcard, tracking
from lmforge.config import POLICIES, ExportConfig
from lmforge.data import posttrain_data
from lmforge.errors import InputError
from lmforge.models import weight_bytes
from lmforge.stage import cli, write_meta


def chosen(cfg: ExportConfig, quantize_metrics: Path, policies: dict[str, Path | None]) -> str:
    name = modelcard.read_json(quantize_metrics).get("policy") if cfg.model == "best" else cfg.model
    if not name or policies.get(name) is None:
        raise InputError(f"export.model {cfg.model!r}: no policy folder for {name!r} (quantize's choice is in "
                         f"{quantize_metrics})")
    return name


def reference(folder: Path, tokenizer, rows: list[dict]) -> list[tuple]:
    """(token ids, the safetensors model's logits) per held-out conversation: computed once, compared per type."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"], return_tensors="pt", return_dict=True)["input_ids"]
            out.append((ids, model(ids).logits[0]))
    return out


def agreement(gguf_dir: Path, gguf_name: str, ref: list[tuple]) -> dict:
    """The GGUF file read back by transformers against the safetensors model's logits on the same token ids: the
    largest logit difference and how often both pick the same next token."""
    import torch
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, trust_remote_code=False).eval()
    worst, same, total = 0.0, 0, 0
    with torch.no_grad():
        for ids, a in ref:
            b = back(ids).logits[0]
            worst = max(worst, (a - b).abs().max().item())
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    return {"max_abs_logit_diff": round(worst, 6), "top1_agreement": round(same / total, 4), "positions": total}


def run(cfg: ExportConfig, *, quantize: Path, evaluate: Path, mix: Path, base: Path, out: Path, tracker,
        **policies: Path | None) -> dict:
    """Write the chosen policy as GGUF files, an Ollama Modelfile and a model card; read each file back to check it."""
    from transformers import AutoTokenizer

    name = chosen(cfg, quantize, policies)
    folder = Path(policies[name])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    context = int(modelcard.read_json(folder / "config.json").get("max_position_embeddings", 0))
    rows = posttrain_data.conversations("test", cfg.verify_conversations, cfg.seed) if cfg.verify_conversations else []
    ref = reference(folder, tokenizer, rows) if rows else []
    files = []
    (out / "gguf").mkdir()
    for kind in cfg.types:
        file = f"gguf/lmforge-{kind}.gguf"
        start = time.perf_counter()
        info = gguf_export.write(folder, out / file, kind, cfg.tokenizer_pre, name=f"lmforge-{name}")
        info.update(file=file, seconds=round(time.perf_counter() - start, 2),
                    size_ratio=round(info["bytes"] / weight_bytes(folder), 4))
        if rows:
            info.update(agreement(out, file, ref))
        print(f"export: {file} {info['bytes'] / 2**20:.2f} MiB" + (f", logits within {info['max_abs_logit_diff']:.3g}, "
              f"same next token {info['top1_agreement']:.1%}" if rows else ""), file=sys.stderr)
        files.append(info)
    ollama = next((f for f in files if f["type"] == "q8_0"), files[-1])
    (out / "Modelfile").write_text(modelcard.modelfile(ollama["file"], tokenizer, context))
    from importlib.metadata import version

    meta = modelcard.read_json(base / "lmforge.json")
    modelcard.write(out, tokenizer, policy=name, base=meta.get("inputs", {}).get("source", ""), license=cfg.license,
                    version=version("lmforge"), commit=tracking.git_commit(), mix=modelcard.read_json(mix),
                    table=modelcard.read_json(evaluate / "table.json"),
                    table_md=(evaluate / "table.md").read_text() if (evaluate / "table.md").exists() else "",
                    files=files, context=context)
    metrics = {"policy": name, "context_length": context, **{f["type"]: {k: v for k, v in f.items() if k != "type"}
                                                             for f in files}}
    write_meta(out, "export", cfg, metrics, {"policy": str(folder)})
    tracker.log_artifact(out / "README.md")
    return metrics


def main(argv: list[str] | None = None) -> int:
    options = {name: {"type": Path, "default": None, "help": f"the {name} policy folder"} for name in POLICIES}
    return cli("export", run, inputs=("quantize", "evaluate", "mix", "base"), options=options, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
