"""Muon for the hidden matrices, AdamW for the rest (lmforge/training/muon.py): the same updates as torch's own
optimizers, the right parameters in each group, and pretrain with it."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge import distributed
from lmforge.config import parse_section
from lmforge.errors import InputError
from lmforge.training import muon
from lmforge.tracking import NullTracker
from tasks import pretrain


def test_the_muon_update_is_torchs_and_the_adamw_update_is_torchs():
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(48, 24)), torch.nn.Parameter(torch.randn(24))
    w_ref, v_ref = copy.deepcopy(w), copy.deepcopy(v)
    ours = muon.MuonAdamW([{"params": [w], "muon": True}, {"params": [v], "weight_decay": 0.0}], lr=0.02,
                          betas=(0.9, 0.95), weight_decay=0.1, ns_dtype=torch.bfloat16)  # torch's Muon iterates in bf16
    theirs = [torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
              torch.optim.AdamW([v_ref], lr=0.02, betas=(0.9, 0.95), weight_decay=0.0)]
    for _ in range(4):
        gw, gv = torch.randn(48, 24), torch.randn(24)
        w.grad, v.grad, w_ref.grad, v_ref.grad = gw.clone(), gv.clone(), gw.clone(), gv.clone()
        ours.step()
        for opt in theirs:
            opt.step()
    assert torch.equal(w, w_ref) and torch.equal(v, v_ref)
    state = ours.state_dict()  # a checkpoint round trip keeps both kinds of state
    again = muon.MuonAdamW([{"params": [w], "muon": True}, {"params": [v], "weight_decay": 0.0}], lr=0.02)
    again.load_state_dict(state)
    assert set(again.state[w]) == {"momentum_buffer"} and set(again.state[v]) == {"step", "exp_avg", "exp_avg_sq"}


def test_orthogonalize_in_fp32_gives_singular_values_near_one():
    g = 100 * torch.randn(64, 16) @ torch.diag(torch.logspace(-1, 0, 16))  # scaled, condition number ~10 x randn's
    s = torch.linalg.svdvals(muon.orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band, not exactly 1
    with pytest.raises(ValueError, match="2-D"):
        muon.MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)


def test_groups_leave_embeddings_head_and_norms_to_adamw(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from lmforge.lm import build_model

    cfg = parse_section("pretrain", dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64))
    model = build_model(cfg, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    hidden, matrices, vectors = (g["params"] for g in muon.param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(hidden) == 2 * 7 and all(names[id(p)].startswith("model.layers.") for p in hidden)
    assert [names[id(p)] for p in matrices] == ["model.embed_tokens.weight"]  # tied: also the head
    assert all(p.dim() == 1 for p in vectors)
    assert len(hidden) + len(matrices) + len(vectors) == len(list(model.parameters()))


def test_muon_under_fsdp_is_refused_before_any_work(tmp_path, monkeypatch, tiny_corpus, tiny_tokenizer_dir):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setenv(distributed.STRATEGY_ENV, "fsdp")
    cfg = parse_section("pretrain", {"optimizer": "muon"})
    with pytest.raises(InputError, match="launch.strategy ddp, or pretrain.optimizer adamw"):
        pretrain.run(cfg, corpus=tiny_corpus, tokenizer=tiny_tokenizer_dir, out=tmp_path / "out", tracker=NullTracker())
