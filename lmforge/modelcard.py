"""What ships beside an exported model: a model card (README.md in the Hugging Face format: a YAML metadata block,
then what the model is, how it was made, how it scored and how to run it) and an Ollama Modelfile."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmforge import chat

# Ollama's templates are Go templates: the two chat formats lmforge's models speak
_OLLAMA_TEMPLATES = {
    "lmforge": "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>",
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
}


def chat_format(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return "lmforge" if chat.END in vocab else "chatml" if "<|im_end|>" in vocab else "other"


def modelfile(gguf_name: str, tokenizer, context: int) -> str:
    """An Ollama Modelfile: the file, its chat template and stop tokens, and the context length."""
    lines = [f"FROM ./{gguf_name}"]
    if template := _OLLAMA_TEMPLATES.get(chat_format(tokenizer)):
        lines.append(f'TEMPLATE """{template}"""')
    stops = dict.fromkeys([chat.end_token(tokenizer), tokenizer.eos_token])
    lines += [f'PARAMETER stop "{s}"' for s in stops if s] + [f"PARAMETER num_ctx {context}",
                                                              "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def _results(table: dict) -> list[dict]:
    """model-index results for the policy: each benchmark metric with its 95% interval where evaluate gave one."""
    row, spans = table.get("rows", {}).get(table["policy"], {}), table.get("intervals", {}).get(table["policy"], {})
    out = []
    for metric, value in row.items():
        task, name = metric.split(".", 1)
        span = spans.get(metric)
        label = f"{name} (95% CI {span['lo']:.3g} to {span['hi']:.3g}, n={span['n']})" if span else name
        out.append({"task": {"type": "text-generation", "name": task},
                    "dataset": {"name": f"lmforge held-out {task}", "type": f"lmforge/{task}"},
                    "metrics": [{"type": name, "value": value, "name": label}]})
    return out


def card(*, policy: str, base: str, license: str, version: str, commit: str, mix: dict, table: dict,
         table_md: str, files: list[dict], context: int, fmt: str) -> str:
    """README.md for out/export: metadata block, then prose and tables from the stages' own outputs."""
    sources = sorted(mix.get("sources", {}))
    meta = {
        "license": license,
        "base_model": base or None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["lmforge", "gguf", "llama", policy],
        "datasets": [f"lmforge/{s}" for s in sources],
        "model-index": [{"name": f"lmforge-{policy}", "results": _results({**table, "policy": policy})}],
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    shares = "\n".join(f"| {s} | {mix['sources'][s].get('docs_train', 0)} | {mix['sources'][s].get('chars_train', 0)} | "
                       f"{mix['sources'][s].get('proportion', 0):.3f} |" for s in sources)
    gguf_rows = "\n".join(f"| `{f['file']}` | {f['type']} | {f['bytes'] / 2**20:.2f} MiB | {f.get('max_abs_logit_diff', '')} |"
                          for f in files)
    example = files[-1]["file"] if files else "model.gguf"
    started = f"continued from `{base}`" if base else "pretrained from scratch by lmforge"
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# lmforge-{policy}

A Llama-architecture chat model made by lmforge {version} (commit `{commit or 'unknown'}`): {started} on the
mixture below, then fine-tuned and aligned; this is the `{policy}` policy, the one the quantize stage chose
(the best held-out exact match among the gated variants). Context length: {context} tokens; chat format:
{fmt}.

## Data

| source | train documents | train characters | share |
| --- | ---: | ---: | ---: |
{shares}

Post-training used lmforge's built-in tasks (arithmetic, copying, comparisons) generated from a fixed seed.

## Evaluation

Every variant of the run on the held-out tasks (95% intervals are in the metadata above and in
`out/evaluate/table.json`; ↑ higher is better, ↓ lower is better):

{table_md.strip()}

## Files

| file | type | size | max abs logit difference vs safetensors |
| --- | --- | ---: | ---: |
{gguf_rows}

## Use

- transformers: `AutoModelForCausalLM.from_pretrained(folder, gguf_file="{example}")`
- llama.cpp: `llama-cli -m {example} -cnv` (the chat template is in the file)
- Ollama: `ollama create lmforge -f Modelfile`, then `ollama run lmforge`
- an OpenAI-compatible endpoint: `make serve-model` in the lmforge project

## Intended use and limitations

A small model for experiments with the training lifecycle itself: comparing recipes, stages and compression on a
laptop. It is not a general assistant: its knowledge is the mixture above, its skills the built-in tasks, and its
scores are those of the table, on lmforge's own held-out items. Do not use it for decisions about people.
"""


def write(out: Path, tokenizer, **fields) -> None:
    (out / "README.md").write_text(card(fmt=chat_format(tokenizer), **fields))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
