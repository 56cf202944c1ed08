import json
import math

import pytest
import torch

from tasks import lora
from lmforge import tracking
from lmforge.config import LoraConfig
from lmforge.errors import InputError
from lmforge.stage import execute

TINY = dict(replay_share=0.0, train_examples=64, test_examples=16, max_steps=6, batch_size=8, lr=2e-2, warmup_steps=0, log_every=2,
            eval_batch_size=16, max_new_tokens=4, num_threads=1, r=4, alpha=8)


def test_lora_trains_an_adapter_and_leaves_the_base_alone(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lora"
    metrics = execute("lora", lora.run, LoraConfig(**TINY), out, {"base": tiny_model_dir}, tracker=tracking.NullTracker())

    assert 0 < metrics["trainable_share"] < 1 and metrics["trainable_params"] > 0
    assert metrics["final_eval_loss"] < metrics["base_eval_loss"]
    for key in ("base_accuracy", "final_accuracy", "merged_accuracy", "train_time_s"):
        assert math.isfinite(metrics[key]), key
    assert json.loads((out / "metrics.json").read_text())["trainable_share"] == metrics["trainable_share"]

    # the adapter loads the way a user would load it, on top of the untouched base
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained

    # merged model: plain transformers; the adapted projections and the chat tokens' embedding rows moved,
    # every other embedding row and the norms did not
    base, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert set(base) == set(merged)
    for name in base:
        changed = not torch.equal(base[name], merged[name])
        assert changed == (any(t in name for t in LoraConfig().target_modules) or "embed_tokens" in name), name
    rows = (base["model.embed_tokens.weight"] != merged["model.embed_tokens.weight"]).any(-1).nonzero().flatten()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert set(rows.tolist()) == set(lora.chat_token_ids(tok))
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(out / "model").chat_template
    assert json.loads((out / "adapter" / "lmforge.json").read_text())["stage"] == "lora"


def test_unknown_target_module_is_an_input_error(tiny_model_dir, tmp_path):
    cfg = LoraConfig(**{**TINY, "target_modules": ["q_proj", "qkv"]})
    with pytest.raises(InputError, match=r"\['qkv'\] are not modules"):
        execute("lora", lora.run, cfg, tmp_path / "lora", {"base": tiny_model_dir}, tracker=tracking.NullTracker())
    assert not (tmp_path / "lora").exists()


def test_qlora_trains_on_a_4bit_base(tiny_model_dir, tmp_path):
    cfg = LoraConfig(**{**TINY, "qlora": True, "max_steps": 3, "target_modules": ["q_proj", "v_proj"]})
    metrics = execute("lora", lora.run, cfg, tmp_path / "q", {"base": tiny_model_dir}, tracker=tracking.NullTracker())
    assert metrics["qlora"] is True and 0 < metrics["trainable_share"] < 1
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "q" / "model" / "model.safetensors").exists()
