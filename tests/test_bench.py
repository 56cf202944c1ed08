"""The benchmark suite's machinery on the smallest sizes: rows measure, skip cleanly and get written.
Not a timing assertion: `python -m bench` takes the figures."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ runs from the checkout (python -m bench); it is not installed
    sys.path.insert(0, str(ROOT))

from bench import core, orchestration, records, report, tokenizing, training  # noqa: E402
from bench.__main__ import main, selected  # noqa: E402


@pytest.fixture()
def ctx(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    sizes = replace(
        core.sizes_for(quick=True, cuda=False),
        pretrain=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64, seq_len=32,
                      batch_size=4, log_every=1, eval_batches=1, sample_tokens=1, sample_prompts=["1"], warmup_steps=1),
        pretrain_warm=1, pretrain_steps=2, matmul_n=128, matmul_seconds=0.05,
    )
    context = core.Context(sizes, workdir=tmp_path / "work", records=tmp_path / "records")
    context.set_data(tiny_corpus, tiny_tokenizer_dir)
    yield context
    context.close()


def test_pretrain_and_mfu_rows_measure_both_sides(ctx):
    rows = training.pretrain_rows(ctx) + training.mfu_rows(ctx)
    assert [r.status for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r.ours > 0 and r.baseline > 0 and math.isfinite(r.value)
    assert rows[0].met is not None and rows[0].target == "≥ 0.95×"
    assert rows[1].value > 0 and rows[1].value_text.endswith("% MFU")
    assert (training.base_model(ctx) / "config.json").exists()  # row 1's model feeds the sft/ppo rows


def test_sft_rows_time_the_stages_against_trl_the_plain_loop_and_padding(ctx):
    rows = training.sft_rows(ctx)
    assert [(r.number, r.status) for r in rows] == [("3a", "ok"), ("3c", "ok"), ("3d", "ok"), ("3e", "ok")]
    for r in rows:
        assert r.ours > 0 and r.baseline > 0 and math.isfinite(r.value)
    assert rows[0].ours == rows[1].ours == rows[2].ours  # one stage figure, three baselines
    assert rows[1].target == rows[3].target == "≥ 0.95×" and rows[2].target == "report"


def test_profiles_list_the_top_operators_of_sft_and_lora_steps(ctx):
    from bench import profiling

    profiles = [profiling.profile_stage(ctx, stage, warm=1, steps=2) for stage in ("sft", "lora")]
    for p in profiles:
        assert p["step_s"] > 0 and 3 <= len(p["rows"]) <= profiling.TOP
        assert any(name in ("aten::mm", "aten::addmm", "aten::bmm") for name, *_ in p["rows"])
        assert sum(share for _, share, _, _ in p["rows"]) <= 1
    page = profiling.markdown(profiles, {}, "abc1234", 2)
    assert "## sft:" in page and "## lora:" in page and "abc1234" in page


def test_tokenizer_row_compares_with_sentencepiece(ctx):
    import sentencepiece  # noqa: F401  (a dev dependency: missing is a failure, not a skip)
    time_row, bpt_row, char_row = tokenizing.tokenizer_rows(ctx, vocab_size=300)
    assert time_row.ours > 0 and time_row.baseline > 0
    assert 1 < bpt_row.ours < 10 and 1 < bpt_row.baseline < 10 and char_row.baseline > 1


def test_missing_stage_and_records_skip_with_a_note(ctx):
    with pytest.raises(core.Skip, match="does not exist yet"):
        core.stage_module("no_such_stage")
    with pytest.raises(core.Skip, match="make run"):
        records.lifecycle_rows(ctx)
    with pytest.raises(core.Skip, match="quantize"):
        records.quantize_rows(ctx)


def test_compression_rows_compare_with_baselines_of_the_same_run(ctx):
    with pytest.raises(core.Skip, match="make run"):
        records.compression_rows(ctx)
    out = ctx.records / "out"
    (out / "quantize").mkdir(parents=True)
    (out / "distill").mkdir()
    ppl = {"fp32": 10.0, "nf4": 12.0, "rtn": 11.0, "gptq": 10.2, "qat": 10.4}
    (out / "quantize/metrics.json").write_text(json.dumps({k: {"perplexity": v, "quantize_s": 1} for k, v in ppl.items()}))
    (out / "distill/metrics.json").write_text(json.dumps({"teacher_source": "t", "bits_per_byte": {"student": 2.0, "control": 2.5}}))
    rows = {r.key: r for r in records.compression_rows(ctx)}
    qat = rows["compression.qat_vs_rtn"]  # log(10.4/10) over log(11/10): ~41% of rtn's loss remains
    assert qat.value == pytest.approx(math.log(1.04) / math.log(1.1)) and qat.met is True and qat.target == "≤ 0.5×"
    assert rows["compression.qat_vs_nf4"].value < qat.value and rows["compression.qat_vs_nf4"].met is None
    assert rows["compression.gptq_vs_rtn"].met is None
    assert rows["compression.distill_vs_control"].value == pytest.approx(0.8)
    # a run of another preset (the real weights) gets its own rows beside the default preset's
    from lmforge.cli.preset import render, resolve

    (ctx.records / "params.yaml").write_text(render("smollm2", resolve("smollm2", ROOT / "configs")))
    real = {r.key: r for r in records.compression_rows(ctx)}
    assert set(real) == {f"{k}.smollm2" for k in rows} and real["compression.qat_vs_rtn.smollm2"].title.endswith("(smollm2)")


def test_steady_rate_starts_after_the_warm_up():
    recs = [(0.0, 1, {"n": 100}), (10.0, 2, {"n": 200}), (11.0, 3, {"n": 300}), (12.0, 4, {"x": 1}),
            (13.0, 5, {"n": 500})]
    assert training.steady_rate(recs, "n", from_step=2) == pytest.approx(100.0)
    with pytest.raises(RuntimeError):
        training.steady_rate(recs, "n", from_step=5)


def test_bump_raises_one_knob_of_one_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("mix:\n  seed: 0  # s\n  sources:\n    - {kind: pydoc}\n"
                      "tokenizer:\n  max_train_chars: 100  # c\npretrain:\n  seed: 7\n")
    assert orchestration.bump(params, "mix") == "mix.seed=1"
    assert orchestration.bump(params, "tokenizer") == "tokenizer.max_train_chars=101"
    assert orchestration.bump(params, "mix") == "mix.seed=2"
    assert "pretrain:\n  seed: 7\n" in params.read_text() and "  seed: 2  # s\n" in params.read_text()
    other = tmp_path / "other.yaml"
    other.write_text("ppo:\n  steps: 1\n")
    with pytest.raises(core.Skip):  # no integer seed to bump
        orchestration.bump(other, "ppo")


def test_cli_reads_records_and_writes_the_table(tmp_path):
    rec, res = tmp_path / "records", tmp_path / "results"
    for stage, seconds in (("mix", 12.5), ("tokenizer", 9.0)):
        (rec / "out" / stage).mkdir(parents=True)
        (rec / "out" / stage / "metrics.json").write_text(json.dumps({"wall_time_s": seconds}))
    (rec / "out" / "quantize").mkdir()
    (rec / "out" / "quantize" / "metrics.json").write_text(json.dumps({
        "fp32": {"tokens_per_s": 100.0, "memory_footprint_bytes": 4000, "perplexity": 10.0},
        "int8": {"tokens_per_s": 50.0, "memory_footprint_bytes": 1000, "perplexity": 10.1},
        "device": "cpu"}))
    argv = ["--quick", "--only", "lifecycle", "8", "tests", "--out", str(res), "--records", str(rec),
            "--workdir", str(tmp_path / "ws")]
    assert main(argv) == 0
    result = json.loads((res / "latest.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    lifecycle = records.lifecycle_kind().key
    assert rows[lifecycle]["ours"] == pytest.approx(21.5)
    assert rows[lifecycle]["met"] is None and "incomplete" in rows[lifecycle]["note"]
    assert rows["quantize.int8"]["value"] == pytest.approx(0.5)
    assert rows["tests"]["status"] == "skipped"
    assert result["machine"]["cpu"] and result["machine"]["versions"]["torch"]
    md = (res / "benchmarks.md").read_text()
    assert "| # | figure |" in md and "Quantised generation: int8" in md and "0.5×" in md
    assert result["commit"] and result["commit"] in md and result["machine"]["cpu_flags"] is not None
    assert not (tmp_path / "ws").exists()  # the workspace is removed after the run

    # a test-suite time recorded by an earlier --full run is carried forward, marked as such
    # (a row written before rows carried their run: it takes the file's, with no commit)
    result["rows"] = [r for r in result["rows"] if r["key"] != "tests"]
    result["rows"].append(core.limit_row("9", "test_suite", "Test suite", 300.0, 600.0, note="x",
                                         measured_note="passed", recorded="2026-01-01 00:00").as_dict())
    result["rows"][0]["run"] = dict(result["rows"][0]["run"], created="2026-01-02 00:00:00 UTC", commit="abc1234")
    (res / "latest.json").write_text(json.dumps(result))
    argv = ["--quick", "--only", "9", "--out", str(res), "--records", str(rec), "--workdir", str(tmp_path / "w2")]
    assert main(argv) == 0
    merged = json.loads((res / "latest.json").read_text())
    rows = {r["key"]: r for r in merged["rows"]}
    # --only 9 re-ran row 9 only; the other rows are kept with the run that measured them
    assert list(rows) == [lifecycle, "quantize.int8", "test_suite"]
    assert rows[lifecycle]["run"]["commit"] == "abc1234"
    assert rows["quantize.int8"]["run"]["created"] == result["created"]
    row = rows["test_suite"]
    assert row["ours"] == 300.0 and row["met"] is True and "recorded" in row["note"]
    assert row["run"]["created"] == result["created"]  # carried forward: the run that measured it
    md = (res / "benchmarks.md").read_text()
    assert "abc1234" in md and "| A |" in md and "| B |" in md


def test_render_rewrites_the_page_from_old_results_without_measuring(tmp_path):
    row = core.ratio_row("1", "k", "fig", 90.0, 100.0, "tokens/s", baseline_name="loop", at_least=0.95).as_dict()
    old = {"args": ["--full"], "created": "then", "sizes": {"name": "cpu"}, "duration_s": 1.0, "noisy": False,
           "machine": {"cpu": "c", "usable_cpus": 2, "logical_cpus": 2, "torch_threads": 2, "gpu": None,
                       "os": "linux", "python": "3.11", "versions": {}, "tokenizers_parallelism": "false"},
           "load": {"start": 0.1, "end": 0.2}, "rows": [row]}
    (tmp_path / "latest.json").write_text(json.dumps(old))
    assert main(["--render", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| A | then | not recorded | `python -m bench --full`" in md and "CPU features: not recorded" in md
    assert "| 0.9× | ≥ 0.95× | **no** | A |" in md


def test_the_committed_page_is_the_render_of_the_committed_results():
    text = report.markdown(json.loads((ROOT / "bench" / "results" / "latest.json").read_text()))
    assert (ROOT / "docs" / "benchmarks.md").read_text() == text, "run `python -m bench --render`"


def test_commit_is_recorded_with_a_dirty_mark(tmp_path):
    assert report.git_commit(tmp_path) == "not recorded"  # not a git checkout
    commit = report.git_commit()
    assert commit == "not recorded" or len(commit.removesuffix("-dirty")) >= 4


def test_row_selection_by_name_or_number():
    assert [g[0] for g in selected(["3"])] == ["sft", "ppo"]
    assert [g[0] for g in selected(["tokenizer", "5"])] == ["tokenizer", "orchestration", "prefect"]
    with pytest.raises(SystemExit):
        selected(["nope"])


def test_markdown_marks_skips_and_failed_targets():
    row = core.ratio_row("1", "k", "fig", 90.0, 100.0, "tokens/s", baseline_name="loop", at_least=0.95)
    skip = core.Row("3a", "sft", "SFT", status="skipped", note="tasks/sft.py does not exist yet")
    text = report.markdown({"args": [], "created": "now", "sizes": {"name": "quick"}, "duration_s": 1.0,
                            "machine": {"cpu": "c", "usable_cpus": 2, "logical_cpus": 2, "torch_threads": 2,
                                        "gpu": None, "os": "linux", "python": "3.11", "versions": {},
                                        "tokenizers_parallelism": "false"},
                            "load": {"start": 0.1, "end": 0.2}, "rows": [row.as_dict(), skip.as_dict()]})
    assert "| 0.9× | ≥ 0.95× | **no** | A |" in text
    assert "skipped: tasks/sft.py does not exist yet" in text


@pytest.mark.slow
def test_row_10_measures_export_and_serving_on_one_model(peaked_model, tmp_path):
    from bench import serving

    ctx = core.Context(core.sizes_for(quick=True, cuda=False), workdir=tmp_path / "ws")
    try:
        rows = serving._export_rows(ctx, "tiny", peaked_model) + serving._serve_rows(ctx, "tiny", peaked_model)
    finally:
        ctx.close()
    by = {r.key: r for r in rows}
    assert by["export.tiny.q8_0"].value < by["export.tiny.f16"].value < 0.6  # against fp32 safetensors
    assert by["serve.tiny.tokens_per_s"].ours > 0 and by["serve.tiny.tokens_per_s"].baseline > 0
    assert by["serve.tiny.first_token"].ours > 0 and by["serve.tiny.tokens_per_s"].target == "≥ 0.9×"
    assert [g[1] for g in selected(["10"])] == ["10"]


def test_a_group_rerun_replaces_its_rows_and_keeps_another_presets():
    from bench.__main__ import merge

    run_a, run_b = {"commit": "a"}, {"commit": "b"}
    old = {"rows": [dict(key="compression.qat_vs_rtn", group="compression", run=run_a),
                    dict(key="lifecycle", group="lifecycle", run=run_a)]}
    new = [dict(key="compression.qat_vs_rtn.smollm2", group="compression", run=run_b)]
    rows = merge(new, old, {"compression"})
    assert [(r["key"], r["run"]["commit"]) for r in rows if r["group"] == "compression"] == \
        [("compression.qat_vs_rtn", "a"), ("compression.qat_vs_rtn.smollm2", "b")]
    again = merge([dict(key="compression.qat_vs_rtn", group="compression", run=run_b)], {"rows": rows}, {"compression"})
    assert [(r["key"], r["run"]["commit"]) for r in again if r["group"] == "compression"] == \
        [("compression.qat_vs_rtn", "b"), ("compression.qat_vs_rtn.smollm2", "b")]
    assert any(r["key"] == "lifecycle" for r in again)  # a group that did not run stays as it was


def test_each_cpu_kind_keeps_its_own_lifecycle_row(monkeypatch):
    from bench.__main__ import merge
    from lmforge import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    wide = records.lifecycle_kind()
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    narrow = records.lifecycle_kind()
    assert wide[0] != narrow[0] and "AVX-512" in wide[1] and "AVX2 only" in narrow[1]
    assert (wide.limit, narrow.limit) == (300.0, 600.0)
    old = {"rows": [dict(key=narrow[0], group="lifecycle", run={"commit": "a"})]}
    rows = merge([dict(key=wide[0], group="lifecycle", run={"commit": "b"})], old, {"lifecycle"})
    assert [(r["key"], r["run"]["commit"]) for r in rows] == [(narrow[0], "a"), (wide[0], "b")]


def test_row_9_sums_the_durations_report_by_module():
    report = ("=== slowest durations ===\n"
              "120.50s setup    tests/test_flow.py::test_first_run\n"
              "3.00s call     tests/test_flow.py::test_second_run[a::b]\n"
              "7.25s teardown tests/test_team.py::test_stack\n"
              "0.01s call     tests/test_words.py::test_words\n"
              "2 passed in 130.76s (0:02:10)\n")
    assert records.module_seconds(report) == {"tests/test_flow.py": 123.5, "tests/test_team.py": 7.25,
                                              "tests/test_words.py": 0.01}
