"""pretrain on a tiny model and corpus: loss falls, outputs load, checkpoints resume only their own run."""

import json

import pytest
import torch

from lmforge import lm
from tasks import pretrain
from lmforge.config import PretrainConfig, parse_section
from lmforge.errors import InputError
from lmforge.stage import execute
from lmforge.tracking import NullTracker

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=32,
            batch_size=8, max_steps=40, lr=3e-3, warmup_steps=4, eval_every=20, eval_batches=2, log_every=5,
            checkpoint_every=20, sample_tokens=4, sample_prompts=["1 + 2 ="])


def cfg(**over):
    return parse_section("pretrain", {**TINY, **over})


def test_lr_schedule_warms_up_then_decays_to_floor():
    c = PretrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    lrs = [lm.lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lm.lr_at(100, c) == pytest.approx(0.1)


def test_loss_falls_and_model_loads(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "ckpt"
    m = execute("pretrain", pretrain.run, cfg(), tmp_path / "out", {"corpus": tiny_corpus, "tokenizer": tiny_tokenizer_dir},
                extra={"checkpoints": ckpt}, tracker=NullTracker())
    assert m["final_val_loss"] < m["initial_val_loss"] - 1.0
    assert set(m["val_loss_by_source"]) == {"prose", "arithmetic"}
    assert m["tokens_per_s"] > 0 and m["flops_per_s"] > m["tokens_per_s"]
    model_dir = tmp_path / "out/model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template and model.config.num_hidden_layers == 2
    assert "1 + 2 =" in (model_dir / "samples.txt").read_text()
    assert json.loads((model_dir / "lmforge.json").read_text())["metrics"]["final_val_loss"] == m["final_val_loss"]
    rows = (tmp_path / "out/curves/train.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_loss,lr,grad_norm") and len(rows) == 1 + 40 // 5
    assert not (ckpt / "last.pt").exists()  # finished runs leave no stale checkpoint to resume


def test_resume_continues_the_same_run_only(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    c = cfg(max_steps=20, optimizer="adamw")  # the checkpoint below holds an AdamW state
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    train = lm.tokenize_split(tok, tiny_corpus, "train")
    model = lm.build_model(c, tok)
    opt = torch.optim.AdamW(lm.param_groups(model, c.weight_decay))
    rng = torch.Generator().manual_seed(0)
    history = {"train": [], "val": [{"step": 0, "val_loss": 9.0}]}
    pretrain.save_checkpoint(tmp_path / "ckpt", 10, model, opt, rng, pretrain.fingerprint(c, train), history)
    m = pretrain.run(c, corpus=tiny_corpus, tokenizer=tiny_tokenizer_dir, out=tmp_path / "o1", tracker=NullTracker(),
                     checkpoints=tmp_path / "ckpt")
    assert m["resumed_from_step"] == 10 and m["initial_val_loss"] == 9.0
    # a checkpoint from another config is ignored, not resumed
    pretrain.save_checkpoint(tmp_path / "ckpt", 10, model, opt, rng, "someone-else", history)
    m = pretrain.run(c, corpus=tiny_corpus, tokenizer=tiny_tokenizer_dir, out=tmp_path / "o2", tracker=NullTracker(),
                     checkpoints=tmp_path / "ckpt")
    assert m["resumed_from_step"] == 0


def test_a_checkpoint_holding_code_is_refused_unloaded(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    """Checkpoints load with weights_only: a pickle that would build arbitrary objects (here a datetime; in an
    attack, a callable) is refused in one line, before anything in it runs."""
    import datetime

    (tmp_path / "ckpt").mkdir()
    torch.save({"step": 3, "when": datetime.datetime(2026, 1, 1)}, tmp_path / "ckpt" / "last.pt")
    with pytest.raises(InputError, match=r"last\.pt: not a checkpoint lmforge wrote"):
        execute("pretrain", pretrain.run, cfg(max_steps=4), tmp_path / "out",
                {"corpus": tiny_corpus, "tokenizer": tiny_tokenizer_dir}, tracker=NullTracker(),
                extra={"checkpoints": tmp_path / "ckpt"})
    assert not (tmp_path / "out").exists()


def test_bad_shape_is_a_clear_error(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="hidden_size .* num_heads"):  # the config refuses it, before any work
        execute("pretrain", pretrain.run, cfg(hidden_size=30, num_heads=4), tmp_path / "out",
                {"corpus": tiny_corpus, "tokenizer": tiny_tokenizer_dir}, tracker=NullTracker())
    assert not (tmp_path / "out").exists()
