"""A Llama-architecture Hugging Face folder (lmforge's own models and SmolLM2 alike) as a GGUF file that llama.cpp,
Ollama and LM Studio load, written with the `gguf` package (GGUFWriter and its numpy quantisers).

What it takes care of, because llama.cpp reads a file by convention, not by schema:
- tensor names: `gguf`'s own map from Hugging Face names to GGUF ones;
- rotary embeddings: Hugging Face rotates the two halves of each head, llama.cpp adjacent pairs, so the rows of
  q_proj and k_proj are interleaved per head (transformers' GGUF reader undoes it when it loads the file back);
- the tokenizer: llama.cpp re-implements pre-tokenisation by name (`tokenizer.ggml.pre`); a shape lmforge cannot
  name is an error that names the knob (export.tokenizer_pre), never a file that tokenises differently;
- the chat template, without the `{% generation %}` marks that only training reads;
- quantisation: Q8_0/Q4_x/Q5_x per weight matrix (the types `gguf` quantises in numpy; k-quants need llama.cpp's
  own quantize tool), where its rows divide into blocks of 32; norms, and matrices that do not divide, stay F32/F16
  (as llama.cpp's own converter does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the ones gguf quantises in numpy
# pre-tokenizer shapes (tokenizer.json) -> llama.cpp's name for the same splitting
_DIGITS_THEN_GPT2 = "smollm"  # every digit its own piece, then GPT-2's regex (llama.cpp: smollm, refact, starcoder)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# the tokenizer stage's regexes (tasks/tokenizer.py bpe_pattern) that llama.cpp splits alike
SPLIT_REGEXES = {
    GPT2.replace(r" ?\p{N}+", r"\p{N}|\s+(?=\p{N})"): _DIGITS_THEN_GPT2,  # gpt2, split_digits (the default)
    GPT2: "gpt-2",  # gpt2, split_digits false
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # gpt4, split_digits false: Llama 3's
}


def tokenizer_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenisation, or None when lmforge knows no equivalent."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return _DIGITS_THEN_GPT2  # SmolLM2's own
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_REGEXES.get(steps[0].get("pattern", {}).get("Regex"))  # lmforge's own BPE
    return None


def _interleave_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [first half; second half] to pairs (i, i + half) side by side."""
    rows = weight.shape[0] // heads
    return weight.reshape(heads, 2, rows // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    file = folder / "chat_template.jinja"
    template = file.read_text() if file.exists() else tok_config.get("chat_template")
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template) if template else None


def _tokenizer(writer, folder: Path, pre: str) -> dict[str, int]:
    """Vocabulary, merges, special ids and chat template into `writer`; returns the special ids it set."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"export: the tokenizer is {model.get('type')}, and lmforge exports byte-level BPE only")
    found = tokenizer_pre(data)
    if pre == "auto":
        if found is None:
            raise ConfigError(
                f"export: llama.cpp names its pre-tokenisers and lmforge knows none equal to this tokenizer's "
                f"({json.dumps(data.get('pre_tokenizer'))[:300]}); set export.tokenizer_pre to the llama.cpp name "
                f"that splits text the same way (gpt-2, smollm, llama-bpe, ...) once you have checked it does")
        pre = found
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED) \
            if i in added else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    ids = {}
    for role in ("bos", "eos", "pad"):
        name = tok_config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name in vocab:
            ids[role] = vocab[name]
            getattr(writer, f"add_{role}_token_id")(vocab[name])
    for end in ("<|end|>", "<|im_end|>", "<|eot_id|>"):  # the token that ends an assistant turn: llama.cpp stops there
        if end in vocab:
            ids["eot"] = vocab[end]
            writer.add_eot_token_id(vocab[end])
            break
    writer.add_add_bos_token(False)  # neither lmforge's template nor SmolLM2's starts with a BOS token
    if template := _chat_template(folder, tok_config):
        writer.add_chat_template(template)
    return ids


def _tensor_type(name: str, array: np.ndarray, kind: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
              "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}[kind]
    if array.ndim == 1 or name.endswith("_norm.weight"):
        return Q.F32  # norms: small, and precision-sensitive
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return Q.F16  # rows that do not divide into blocks
    return wanted


def write(folder: Path, out: Path, kind: str, pre: str = "auto", name: str = "lmforge") -> dict:
    """`folder` (safetensors) as a GGUF file of type `kind` at `out`. Returns what was written, for metrics."""
    import gguf
    import torch
    from safetensors.torch import load_file

    if kind not in TYPES:
        raise ConfigError(f"export: unknown GGUF type {kind!r} (choose from {', '.join(TYPES)})")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ConfigError(f"export: lmforge writes GGUF for Llama-architecture models; this one is "
                          f"{config.get('model_type')!r}")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"export: rope scaling {rope.get('rope_type')!r} is not exported (default RoPE only)")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}[kind])
    special = _tokenizer(writer, folder, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    counts: dict[str, int] = {}
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd for the output
        array = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            array = _interleave_rope(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _interleave_rope(array, kv_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"export: no GGUF name for tensor {hf_name!r} (not a plain Llama checkpoint)")
        qtype = _tensor_type(gguf_name, array, kind)
        Q = gguf.GGMLQuantizationType
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"type": kind, "bytes": out.stat().st_size, "tensors_by_type": counts,
            "context_length": config["max_position_embeddings"], **{f"{k}_token_id": v for k, v in special.items()}}
