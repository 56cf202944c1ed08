"""bitsandbytes on every CPU: both 4-bit CPU paths (packed AVX512-BF16 kernel and the generic one) and both
int8 matmul kernels, on the shapes users configure. Where this CPU lacks AVX512-BF16 the packed kernel is
emulated (conftest.cpu_4bit_path); the repacking that carries the shape rules is bitsandbytes' own code."""

import json

import pytest
import torch

import bitsandbytes as bnb

from lmforge import lowbit, models, tracking
from lmforge.config import QuantizeConfig
from lmforge.errors import InputError
from lmforge.runtime import pick_device
from lmforge.stage import execute
from tasks import quantize

TINY = dict(ppl_tokens=256, batch_size=4, gen_tokens=4, gen_repeats=1, num_threads=1)


def quantized_linear(out_f: int, in_f: int) -> "bnb.nn.Linear4bit":
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f) / in_f**0.5, requires_grad=False, quant_type="nf4")
    return layer.to("cpu").eval()  # .to() quantises


@pytest.mark.parametrize("out_f, in_f", [(64, 64), (96, 128), (32, 192), (96, 64), (172, 64), (64, 96), (64, 32), (10, 30)])
def test_packable_rule_is_bitsandbytes_rule(out_f, in_f):
    """lowbit.packable says yes exactly where bitsandbytes' own repacking for the AVX512-BF16 kernel
    succeeds (pure torch: runs on any CPU). If a bitsandbytes upgrade changes its rule, this fails."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer = quantized_linear(out_f, in_f)
    try:
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), layer.weight.quant_state)
        repacks = True
    except (RuntimeError, AssertionError):
        repacks = False
    assert lowbit.packable(out_f, in_f) == repacks


def test_unguarded_odd_layer_breaks_the_packed_path_and_the_guard_fixes_it(cpu_4bit_path):
    """The bug a CPU with AVX512-BF16 met (issue: shape '[32, 0]' is invalid / N must be divisible by
    block_n), reproduced on any CPU; lmforge's guard sends such layers down the generic path."""
    path, _ = cpu_4bit_path
    x = torch.randn(3, 96)
    expected = torch.nn.functional.linear(x, bnb.functional.dequantize_4bit(
        quantized_linear(64, 96).weight.data, quantized_linear(64, 96).weight.quant_state))
    with torch.no_grad():
        if path == "packed":
            with pytest.raises((RuntimeError, AssertionError)):
                quantized_linear(64, 96)(x)
        wrapped = torch.nn.Sequential(quantized_linear(64, 96))
        changed = lowbit.guard_packed_path(wrapped)
        assert changed == (["0"] if path == "packed" else [])
        torch.testing.assert_close(wrapped(x), expected, atol=1e-4, rtol=1e-4)


def test_packed_and_generic_paths_agree_on_a_packable_layer(cpu_4bit_path):
    path, kernel = cpu_4bit_path
    layer, x = quantized_linear(96, 128), torch.randn(5, 128)
    with torch.no_grad():
        y = layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == (path == "packed")
    reference = torch.nn.functional.linear(x, bnb.functional.dequantize_4bit(
        quantized_linear(96, 128).weight.data, quantized_linear(96, 128).weight.quant_state))
    # the packed path computes in bf16 with bf16 block scales: agreement to bf16 precision
    torch.testing.assert_close(y, reference, atol=0.05, rtol=0.05)


def test_training_mode_guard_turns_packed_path_off_everywhere(cpu_4bit_path):
    model = torch.nn.Sequential(quantized_linear(96, 128), quantized_linear(64, 96))
    changed = lowbit.guard_packed_path(model, training=True)
    assert changed == (["0", "1"] if cpu_4bit_path[0] == "packed" else [])
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model)


@pytest.mark.parametrize("m, n, k", [(3, 5, 7), (1, 33, 65), (17, 96, 688)])
def test_int8_matmul_kernels_take_any_shape(m, n, k):
    """LLM.int8() on CPU: bitsandbytes registers torch._int_mm where the CPU has AVX-512, a dequantising
    fallback elsewhere. Both are run here on odd shapes, whatever this CPU has, against exact integer math."""
    from bitsandbytes.backends.default.ops import _int8_linear_matmul_impl

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    exact = a.long() @ b.long().T
    assert torch.equal(_int8_linear_matmul_impl(a, b).long(), exact)  # CPUs without AVX-512
    assert torch.equal(torch._int_mm(a, b.T.contiguous()).long(), exact)  # CPUs with AVX-512
    assert torch.equal(torch.ops.bitsandbytes.int8_linear_matmul(a, b).long(), exact)  # what this CPU runs


# ------------------------------------------------------------------------------ the quantize stage
def _quantize(model_dir, corpus, out, **overrides):
    cfg = QuantizeConfig(**{**TINY, **overrides})
    return execute("quantize", quantize.run, cfg, out, {"model": model_dir, "corpus": corpus},
                   tracker=tracking.NullTracker())


def test_nf4_keeps_odd_layers_and_runs_with_plain_transformers(cpu_4bit_path, odd_model_dir, tiny_corpus, tmp_path):
    """Default nf4_unpackable: keep. The saved folder loads with plain transformers (no lmforge code) and
    generates on either CPU path; the kept layer is named in lmforge.json and counted in the metrics."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "quantize"
    metrics = _quantize(odd_model_dir, tiny_corpus, out, methods=["int8", "nf4"])
    nf4 = metrics["nf4"]
    assert nf4["kept_for_cpu_kernel"] == 1 and metrics["int8"]["kept_for_cpu_kernel"] == 0
    assert 0 < nf4["lowbit_param_share"] < metrics["int8"]["lowbit_param_share"] < 1
    meta = json.loads((out / "nf4" / "lmforge.json").read_text())
    assert meta["kept_for_cpu_kernel"] == ["model.layers.0.mlp.down_proj"]

    model = AutoModelForCausalLM.from_pretrained(out / "nf4").eval()
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    up = model.model.layers[0].mlp.up_proj
    assert getattr(up.weight.quant_state, "packing_format_for_cpu", False) == (cpu_4bit_path[0] == "packed")


def test_nf4_quantize_all_runs_through_lmforge_loaders(cpu_4bit_path, odd_model_dir, tiny_corpus, tmp_path):
    """nf4_unpackable: quantize converts every layer; lmforge's loader (evaluate, quantize's own reload)
    guards the odd one, so the perplexity is measured on either path; plain transformers on the packed
    path meets bitsandbytes' error, which is why `keep` is the default."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "quantize"
    metrics = _quantize(odd_model_dir, tiny_corpus, out, methods=["nf4"], nf4_unpackable="quantize")
    assert metrics["nf4"]["full_precision_layers"] == 1  # the tied output head only
    model = models.load_causal_lm(out / "nf4", pick_device("cpu"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    if cpu_4bit_path[0] == "packed":
        plain = AutoModelForCausalLM.from_pretrained(out / "nf4").eval()
        with torch.no_grad(), pytest.raises((RuntimeError, AssertionError)):
            plain(input_ids=torch.tensor([[1, 2, 3]]))


def test_nf4_refuses_a_model_with_no_packable_layer(tiny_tokenizer, tiny_corpus, tmp_path):
    from conftest import save_llama

    narrow = save_llama(tmp_path / "narrow", tiny_tokenizer, hidden=32, intermediate=48, layers=1)
    with pytest.raises(InputError, match="nf4_unpackable"):
        _quantize(narrow, tiny_corpus, tmp_path / "q", methods=["nf4"])
    assert not (tmp_path / "q").exists()


def test_kernel_note_is_one_plain_line(capsys, monkeypatch):
    monkeypatch.setattr(lowbit, "_noted", set())
    note = lowbit.kernel_note("cpu")
    assert note and "\n" not in note and "AVX512-BF16" in note
    assert lowbit.kernel_note("cpu") is None  # once per process
    assert capsys.readouterr().err.count("note:") == 1


def test_evaluate_runs_nf4_on_either_path(cpu_4bit_path, odd_model_dir, tiny_corpus, tmp_path):
    """evaluate's nf4 variant, every layer 4-bit (the odd one included), through lm-eval on both paths."""
    from tasks import evaluate
    from lmforge.config import EvaluateConfig

    _quantize(odd_model_dir, tiny_corpus, tmp_path / "q", methods=["nf4"], nf4_unpackable="quantize")
    cfg = EvaluateConfig(variants=["base", "nf4"], tasks=["arith_mc", "heldout_ppl"], mc_questions=8, ppl_docs=2,
                         ppl_max_chars=200, batch_size=8, num_threads=1)
    metrics = execute("evaluate", evaluate.run, cfg, tmp_path / "evaluate", {"corpus": tiny_corpus},
                      extra={"base": odd_model_dir, "nf4": tmp_path / "q" / "nf4"}, tracker=tracking.NullTracker())
    base, nf4 = metrics["base"]["ppl_arithmetic"]["bits_per_byte"], metrics["nf4"]["ppl_arithmetic"]["bits_per_byte"]
    assert abs(nf4 - base) / base < 0.05  # 4-bit rounding of a random model moves bits/byte little


def test_qlora_trains_on_either_path(cpu_4bit_path, odd_model_dir, tmp_path):
    """QLoRA measures accuracy in eval mode (where the packed path would repack) before training: the
    adapters must still get gradients through every 4-bit layer, the odd one included."""
    from tasks import lora
    from lmforge.config import LoraConfig

    cfg = LoraConfig(replay_share=0.0, train_examples=32, test_examples=8, max_steps=3, batch_size=8, lr=2e-2, warmup_steps=0,
                     log_every=1, eval_batch_size=8, max_new_tokens=3, num_threads=1, r=4, alpha=8, qlora=True,
                     target_modules=["q_proj", "down_proj"])
    metrics = execute("lora", lora.run, cfg, tmp_path / "q", {"base": odd_model_dir}, tracker=tracking.NullTracker())
    assert metrics["qlora"] is True and metrics["final_eval_loss"] < metrics["base_eval_loss"]
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "q" / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # every adapter got a gradient


def test_bitsandbytes_import_warning_is_filtered(caplog):
    """On AVX512-BF16 CPUs bitsandbytes logs an optional-kernel warning at import in every process (PEFT and
    TRL import it); importing lmforge's package installs the filter before that can happen."""
    import logging

    import lmforge  # noqa: F401

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
