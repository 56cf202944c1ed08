"""The export: GGUF files that transformers reads back with the same logits (within a tolerance per type) and that
llama.cpp tokenises and answers exactly as transformers does; a tokenizer lmforge cannot name is an error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge import gguf_export
from lmforge.config import TokenizerConfig
from lmforge.errors import ConfigError

# the logits read back against the safetensors model's: relative RMS difference allowed, per type. The model is a
# random one with a large initialisation (decisive next tokens), whose two blocks amplify each weight's rounding:
# per weight, q8_0 rounds to 0.5% of the weights' spread, q5_0 to 4%, q4_0 to 9% (measured with gguf.quants)
TOLERANCE = {"f32": 1e-6, "f16": 0.005, "bf16": 0.03, "q8_0": 0.08, "q5_1": 0.4, "q5_0": 0.4, "q4_1": 0.7, "q4_0": 0.7}
TEXTS = ["What is 12 + 7? 12 + 7 = 19.", "def add(a, b):\n    return a + b  # 3 spaces   then", "  leading, trailing  ",
         "The quick brown fox's tail; 1234567 digits, x2 and 2x.", "<|user|>hi<|end|><|assistant|>"]
CHATS = [[{"role": "user", "content": "What is 40 + 38?"}], [{"role": "user", "content": "Copy: fox dog"}]]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize("kind", list(TOLERANCE))
def test_each_type_reads_back_with_the_same_logits(peaked_model, tiny_tokenizer, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    info = gguf_export.write(peaked_model, tmp_path / f"m-{kind}.gguf", kind)
    ids = tiny_tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    ref = _logits(AutoModelForCausalLM.from_pretrained(peaked_model).eval(), ids)
    back = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{kind}.gguf").eval(), ids)
    relative = ((back - ref).norm() / ref.norm()).item()
    assert relative <= TOLERANCE[kind], (kind, relative)
    if kind in ("f32", "f16", "bf16", "q8_0"):
        assert torch.equal(back.argmax(-1), ref.argmax(-1))  # the same next token at every position
    if kind.startswith("q"):  # every matrix of the 2 blocks and token_embd quantised; the 5 norms stay f32
        assert info["tensors_by_type"] == {kind.upper(): 15, "F32": 5}


def test_the_tokenizer_stage_shapes_map_to_llama_cpp_names_or_none():
    from tasks.tokenizer import bpe_pattern

    def named(**knobs):
        pattern = bpe_pattern(TokenizerConfig(**knobs))
        return gguf_export.tokenizer_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": False}]}})

    assert named(pre_tokenizer="gpt2", split_digits=True) == "smollm"
    assert named(pre_tokenizer="gpt2", split_digits=False) == "gpt-2"
    assert named(pre_tokenizer="gpt4", split_digits=False) == "llama-bpe"
    assert named(pre_tokenizer="gpt2_eol") is None and named(pre_tokenizer="gpt4", split_digits=True) is None


def test_an_unknown_tokenizer_shape_is_an_error_naming_the_knob(peaked_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(peaked_model, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="export.tokenizer_pre"):
        gguf_export.write(folder, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() or (tmp_path / "m.gguf").stat().st_size == 0
    gguf_export.write(folder, tmp_path / "named.gguf", "f16", pre="gpt-2")  # the user's word is taken


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_tokenises_and_answers_as_transformers_does(peaked_model, tiny_tokenizer, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from infra import llamacpp

    gguf_export.write(peaked_model, tmp_path / f"m-{kind}.gguf", kind)
    end = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    prompts = [tiny_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CHATS]
    ran = llamacpp.check(tmp_path / f"m-{kind}.gguf", TEXTS, CHATS, prompts, [end], max_tokens=12)
    assert ran["metadata"]["tokenizer.ggml.pre"] == "smollm"
    assert ran["tokens"] == [tiny_tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    # transformers on the same file's weights: the same greedy token ids after the same prompt
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m-{kind}.gguf").eval()
    for prompt, ids_llama in zip(prompts, ran["greedy"]):
        ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[end, tiny_tokenizer.eos_token_id])
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in (end, tiny_tokenizer.eos_token_id)]
        assert ids_llama == new, (kind, prompt, ids_llama, new)
    # and the file's own chat template renders those prompts: the chat reply goes on the same way (llama-cpp-python
    # counts max_tokens after its own UTF-8 repair, so it can run a token or two further)
    for reply, text in zip(ran["replies"], ran["greedy_text"]):
        assert text and reply.startswith(text), (reply, text)
