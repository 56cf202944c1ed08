import csv
import json
import math

import pytest
import torch

from lmforge import models
from tasks import quantize
from lmforge import tracking
from lmforge.config import QuantizeConfig
from lmforge.errors import InputError
from lmforge.stage import execute

TINY = dict(ppl_tokens=512, batch_size=4, gen_tokens=4, gen_repeats=1, num_threads=1, qat_steps=10, qat_batch_size=4,
            gptq_windows=8, window_tokens=64)
INT4 = ("rtn", "gptq", "qat")


class RecordingTracker(tracking.NullTracker):
    def __init__(self):
        self.logged, self.artifacts = [], []

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "quantize"
    tracker = RecordingTracker()
    metrics = execute("quantize", quantize.run, QuantizeConfig(**TINY), out,
                      {"model": tiny_model_dir, "corpus": tiny_corpus}, tracker=tracker)
    return out, metrics, tracker


@pytest.mark.parametrize("method, layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"), ("rtn", None),
                                           ("gptq", None), ("qat", None)])
def test_variant_loads_quantised_with_plain_transformers(quantized, tiny_model_dir, method, layer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics, _ = quantized
    folder = out / method
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(folder)  # no quantization_config passed: config.json carries it
    if layer:
        assert qconfig["quant_method"] == "bitsandbytes"
        assert any(type(m).__name__ == layer for m in model.modules())
    else:  # int4, 64 columns per scale, packed 8 to an int32: the format vLLM loads
        assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
        weights = qconfig["config_groups"]["group_0"]["weights"]
        assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 64, True)
        packed = [p for n, p in model.named_parameters() if n.endswith("weight_packed")]
        assert len(packed) == metrics[method]["lowbit_layers"] > 0 and all(p.dtype == torch.int32 for p in packed)
    assert models.weight_bytes(folder) < models.weight_bytes(tiny_model_dir)
    assert model.get_memory_footprint() < AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_memory_footprint()

    tok = AutoTokenizer.from_pretrained(folder)  # the tokenizer and chat template travel with it
    assert tok.chat_template
    ids = tok("What is 2 + 3?", return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out_ids.shape[1] == ids["input_ids"].shape[1] + 3

    meta = json.loads((folder / "lmforge.json").read_text())
    assert meta["stage"] == "quantize" and meta["metrics"]["bits"] == metrics[method]["bits"]


def test_metrics_and_tradeoff_table(quantized):
    out, metrics, tracker = quantized
    fp32, int8, nf4 = metrics["fp32"], metrics["int8"], metrics["nf4"]
    for m in (fp32, int8, nf4):
        for key in ("size_bytes", "memory_footprint_bytes", "perplexity", "tokens_per_s", "size_ratio", "ppl_ratio"):
            assert math.isfinite(m[key]) and m[key] > 0, key
    assert fp32["size_ratio"] == 1.0
    assert int8["size_bytes"] < fp32["size_bytes"] and nf4["size_bytes"] < fp32["size_bytes"]
    # on disk nf4 pays ~1.3 KB of quantisation state per layer (double-quant code book, absmax, JSON), more
    # than 4 bits save on this fixture's 32x32 layers; in memory 4 bits win already
    assert nf4["memory_footprint_bytes"] < int8["memory_footprint_bytes"] < fp32["memory_footprint_bytes"]
    # a random model's perplexity moves little when its weights are rounded: same tokens, same scale
    assert 0.9 < int8["ppl_ratio"] < 1.1 and 0.8 < nf4["ppl_ratio"] < 1.25
    assert metrics["heldout_tokens"] == TINY["ppl_tokens"]

    rtn, gptq, qat = (metrics[m] for m in INT4)
    assert rtn["size_bytes"] == gptq["size_bytes"] == qat["size_bytes"] < int8["size_bytes"]  # one format, one grid
    assert rtn["lowbit_layers"] == nf4["lowbit_layers"]  # every linear layer but the output head
    assert qat["qat_steps"] == TINY["qat_steps"] and qat["qat_tokens"] == 10 * 4 * 64
    assert 0 < qat["qat_kl_last"] < 1 and 0.8 < qat["ppl_ratio"] < 1.25 and 0.8 < gptq["ppl_ratio"] < 1.25
    assert any("qat_kl" in m for m in tracker.logged)  # QAT's curve, step by step

    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert [r["variant"] for r in rows] == ["fp32", "int8", "nf4", *INT4]
    assert float(rows[2]["size_ratio"]) == nf4["size_ratio"]
    assert json.loads((out / "metrics.json").read_text())["int8"]["bits"] == 8
    assert any(p.endswith("tradeoff.csv") for p in tracker.artifacts)
    assert any("int8" in m and "perplexity" in m["int8"] for m in tracker.logged)  # MLflow: int8.perplexity


def test_bad_inputs_fail_before_work(quantized, tiny_model_dir, tiny_corpus, tmp_path):
    cfg = QuantizeConfig(**TINY)
    with pytest.raises(InputError, match="does not exist"):
        execute("quantize", quantize.run, cfg, tmp_path / "o", {"model": tmp_path / "nope", "corpus": tiny_corpus},
                tracker=tracking.NullTracker())
    with pytest.raises(InputError, match="already quantised"):
        quantize.run(cfg, model=quantized[0] / "int8", corpus=tiny_corpus, out=tmp_path / "o2",
                     tracker=tracking.NullTracker())
    with pytest.raises(InputError, match="no val/ folder"):
        quantize.run(cfg, model=tiny_model_dir, corpus=tmp_path, out=tmp_path / "o3", tracker=tracking.NullTracker())


def test_skip_modules_mean_the_same_layers_to_every_method(tiny_model_dir, tiny_corpus, tmp_path):
    """`skip_modules: [down_proj]` (a suffix) keeps every down_proj in full precision in bitsandbytes' nf4, in rtn
    and in qat alike (qat neither fake-quantises nor packs them), and the low-bit share says so."""
    from transformers import AutoModelForCausalLM

    cfg = QuantizeConfig(**{**TINY, "qat_steps": 2, "methods": ["nf4", "rtn", "qat"], "skip_modules": ["lm_head", "down_proj"],
                            "nf4_unpackable": "quantize"})
    m = execute("quantize", quantize.run, cfg, tmp_path / "q", {"model": tiny_model_dir, "corpus": tiny_corpus},
                tracker=tracking.NullTracker())
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = sum(1 for n, _ in full.named_modules() if n.endswith("down_proj"))
    for method in ("nf4", "rtn", "qat"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / method)
        kept = {n: type(mod).__name__ for n, mod in model.named_modules() if n.endswith("down_proj")}
        assert len(kept) == layers and all(t == "Linear" for t in kept.values()), (method, kept)
        assert not any(n.endswith("down_proj.weight_packed") for n, _ in model.named_parameters())
    assert m["rtn"]["lowbit_param_share"] == m["qat"]["lowbit_param_share"] == m["nf4"]["lowbit_param_share"]
    assert m["rtn"]["lowbit_param_share"] < quantize.lowbit_share(full, ["lm_head"])


def test_cli_reports_missing_model(tiny_corpus, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("quantize:\n  methods: [nf4]\n  model: sft\n")
    code = quantize.main(["--params", str(params), "--sft", str(tmp_path / "missing"), "--corpus", str(tiny_corpus),
                          "--out", str(tmp_path / "out")])
    assert code == 2
    assert "missing model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_perplexity_counts_every_target_once():
    class Uniform(torch.nn.Module):  # logits all equal: perplexity = vocabulary size exactly
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    assert quantize.perplexity(Uniform(), torch.arange(37) % 50, seq_len=8, batch_size=3) == pytest.approx(50.0)


def test_best_policy_by_heldout_exact_match(tiny_model_dir, tmp_path):
    import shutil

    from lmforge.config import DpoConfig, SftConfig
    from lmforge.stage import write_meta

    dirs = {}
    for name, cfg, metrics in [("sft", SftConfig(), {"final_accuracy": 0.4}), ("dpo", DpoConfig(), {"gt_accuracy": 0.55}),
                               ("grpo", DpoConfig(), {"gt_accuracy": 0.55})]:
        dirs[name] = shutil.copytree(tiny_model_dir, tmp_path / name)
        write_meta(dirs[name], name, cfg, metrics)
    assert quantize.choose_policy("best", dirs) == ("dpo", {"sft": 0.4, "dpo": 0.55, "grpo": 0.55})  # tie: earlier
    assert quantize.choose_policy("sft", {**dirs, "ppo": None}) == ("sft", {})
    with pytest.raises(InputError, match="no --ppo folder"):
        quantize.choose_policy("ppo", dirs)
    write_meta(dirs["sft"], "sft", SftConfig(), {})
    with pytest.raises(InputError, match="no metrics.final_accuracy to rank the sft policy"):
        quantize.choose_policy("best", dirs)
