import json
import logging
import math
import time

import pytest

from lmforge import lm_eval_tasks as benchmarks
from tasks import evaluate
from lmforge import tracking
from lmforge.lm_eval_tasks import scoring
from lmforge.config import EvaluateConfig
from lmforge.errors import InputError
from lmforge.stage import execute

TINY = dict(mc_questions=12, gen_questions=8, max_gen_tokens=4, cloze_items=8, cloze_source="prose", ppl_docs=3,
            ppl_max_chars=300, batch_size=8, num_threads=1)
BUILTIN_COLUMNS = ("arith_mc.acc", "arith_mc.acc_norm", "arith_gen.exact_match", "cloze.acc", "cloze.acc_norm",
                   "ppl_prose.bits_per_byte", "ppl_arithmetic.bits_per_byte", "ppl_arithmetic.word_perplexity")


class RecordingTracker(tracking.NullTracker):
    def __init__(self):
        self.logged, self.artifacts = [], []

    def log_metrics(self, metrics, step=None):
        self.logged.append(tracking.flatten(metrics))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


def _local_extra_task(folder):
    """A user task given by YAML path: a tiny multiple-choice set on local data."""
    data = folder / "extra.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "label": 0}) + "\n"
                            for i in range(10)))
    spec = folder / "my_extra.yaml"
    spec.write_text(
        "task: my_extra\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return spec


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """base and sft: the same fixture model twice, all built-in tasks, plus extras (one local, two unavailable)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = EvaluateConfig(**TINY, variants=["base", "sft"], extra_limit=5,
                         extra_tasks=["hellaswag", "no_such_task_xyz", str(_local_extra_task(root))])
    tracker = RecordingTracker()
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    evaluate.log.addHandler(handler)
    try:
        metrics = execute("evaluate", evaluate.run, cfg, root / "evaluate", {"corpus": tiny_corpus},
                          extra={"base": tiny_model_dir, "sft": tiny_model_dir}, tracker=tracker)
    finally:
        evaluate.log.removeHandler(handler)
    return root / "evaluate", metrics, tracker, warnings


def test_every_builtin_task_runs_for_every_variant(evaluated):
    out, metrics, tracker, _ = evaluated
    table = json.loads((out / "table.json").read_text())
    assert table["variants"] == ["base", "sft"]
    for variant in ("base", "sft"):
        row = table["rows"][variant]
        for column in BUILTIN_COLUMNS:
            assert math.isfinite(row[column]), (variant, column)
        assert 0 <= row["arith_mc.acc"] <= 1 and 0 <= row["arith_gen.exact_match"] <= 1
        assert row["ppl_prose.bits_per_byte"] > 0
    assert table["rows"]["base"] == table["rows"]["sft"]  # same model, same items: same numbers
    assert table["higher_is_better"]["arith_mc.acc"] is True and table["higher_is_better"]["cloze.acc_norm"] is True
    assert table["examples"]["arith_mc"] == TINY["mc_questions"] and table["examples"]["cloze"] == TINY["cloze_items"]

    gain = table["gains_over_base"]["sft"]["arith_mc.acc"]  # same model: no gain, an interval of width 0
    assert gain == {"gain": 0.0, "lo": 0.0, "hi": 0.0, "n": TINY["mc_questions"], "beyond_noise": False}
    assert set(table["gains_over_base"]["sft"]) >= {"arith_gen.exact_match", "cloze.acc"}
    md = (out / "table.md").read_text()
    assert "| metric | base | sft |" in md and "arith_gen.exact_match" in md and "(within noise)" in md
    # nested per variant for DVC, dotted for MLflow
    assert metrics["sft"]["arith_gen"]["exact_match"] == table["rows"]["sft"]["arith_gen.exact_match"]
    assert json.loads((out / "metrics.json").read_text())["base"]["cloze"]["acc"] == table["rows"]["base"]["cloze.acc"]
    assert any("base.arith_mc.acc" in m for m in tracker.logged)
    assert any(p.endswith("table.md") for p in tracker.artifacts)


def test_lm_eval_results_and_samples_are_kept(evaluated):
    out, _, tracker, _ = evaluated
    for variant in ("base", "sft"):
        res = json.loads((out / "lm_eval" / f"{variant}.json").read_text())
        assert {"lmforge_arith_mc", "lmforge_arith_gen", "lmforge_cloze", "lmforge_ppl_prose"} <= set(res["results"])
        gen = res["samples"]["lmforge_arith_gen"]
        assert len(gen) == TINY["gen_questions"] and gen[0]["doc"]["prompt"].endswith("<|assistant|>")
        assert res["configs"]["lmforge_arith_gen"]["generation_kwargs"]["until"] == ["<|end|>"]
    assert sum("lm_eval" in p for p in tracker.artifacts) == 2
    items = [json.loads(line) for line in (out / "benchmarks" / "arith_mc.jsonl").read_text().splitlines()]
    assert all(len(i["choices"]) == 4 and i["choices"][i["label"]] for i in items)


def test_extra_tasks_run_when_available_and_warn_otherwise(evaluated):
    out, _, _, warnings = evaluated
    table = json.loads((out / "table.json").read_text())
    assert math.isfinite(table["rows"]["base"]["my_extra.acc"])
    res = json.loads((out / "lm_eval" / "base.json").read_text())
    assert res["n-samples"]["my_extra"]["effective"] == 5  # extra_limit
    assert set(table["skipped_extra_tasks"]) == {"hellaswag", "no_such_task_xyz"}
    assert "OfflineModeIsEnabled" in table["skipped_extra_tasks"]["hellaswag"]
    assert len(warnings) == 2 and all(w.startswith("warning: evaluate: extra task") for w in warnings)
    assert all("\n" not in w for w in warnings)


def test_unavailable_extra_task_is_skipped_quickly():
    start = time.perf_counter()
    with evaluate.hub_offline(True):
        _, available, skipped = evaluate.resolve_extra_tasks(EvaluateConfig(extra_tasks=["hellaswag"], extra_timeout_s=30))
    assert available == [] and "hellaswag" in skipped
    assert time.perf_counter() - start < 30


def test_missing_variant_is_an_input_error(tiny_model_dir, tiny_corpus, tmp_path):
    cfg = EvaluateConfig(**TINY, variants=["base", "ppo"])
    with pytest.raises(InputError, match="--ppo"):
        execute("evaluate", evaluate.run, cfg, tmp_path / "a", {"corpus": tiny_corpus},
                extra={"base": tiny_model_dir}, tracker=tracking.NullTracker())
    with pytest.raises(InputError, match="missing ppo model"):
        execute("evaluate", evaluate.run, cfg, tmp_path / "b", {"corpus": tiny_corpus},
                extra={"base": tiny_model_dir, "ppo": tmp_path / "nope"}, tracker=tracking.NullTracker())
    with pytest.raises(InputError, match="cloze"):
        execute("evaluate", evaluate.run, EvaluateConfig(**{**TINY, "cloze_source": "pydoc"}, variants=["base"]),
                tmp_path / "c", {"corpus": tiny_corpus}, extra={"base": tiny_model_dir}, tracker=tracking.NullTracker())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging folders removed


def test_quality_gate(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    quick = {**TINY, "tasks": ["arith_mc"], "variants": ["base", "sft"], "gate_variant": "sft", "gate_metric": "arith_mc.acc"}
    metrics = execute("evaluate", evaluate.run, EvaluateConfig(**quick, min_gain_over_base=0.0), tmp_path / "pass",
                      {"corpus": tiny_corpus}, extra={"base": tiny_model_dir, "sft": tiny_model_dir},
                      tracker=tracking.NullTracker())
    assert metrics["gate"] == {"gain": 0.0, "passed": 1}
    assert "Quality gate passed" in (tmp_path / "pass" / "table.md").read_text()

    # through the CLI: sft is the base model, so a required gain of 0.05 fails: exit 2, one line, nothing published
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in quick.items())
                      + "  min_gain_over_base: 0.05\n")
    code = evaluate.main(["--params", str(params), "--corpus", str(tiny_corpus), "--base", str(tiny_model_dir),
                          "--sft", str(tiny_model_dir), "--out", str(tmp_path / "fail")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: evaluate: quality gate failed: sft arith_mc.acc" in err and "Quality gate FAILED" in err
    assert not (tmp_path / "fail").exists()


def test_gate_config_is_checked():
    with pytest.raises(ValueError, match="quality gate needs base"):
        EvaluateConfig(variants=["ppo"], min_gain_over_base=0.1)
    with pytest.raises(ValueError, match="needs arith_gen in tasks"):
        EvaluateConfig(tasks=["arith_mc"], min_gain_over_base=0.1)


def test_benchmark_items(tiny_corpus, tiny_tokenizer):
    mc = benchmarks.arith_mc_rows(40, 4, seed=0)
    assert len({r["question"] for r in mc}) == len(mc) and all(len(set(r["choices"])) == 4 for r in mc)
    assert all(str(eval(r["question"][8:-1].replace("times", "*"))) == r["choices"][r["label"]]
               for r in mc if r["task"] in ("add", "sub", "mul"))
    gen = benchmarks.arith_gen_rows(8, 0, tiny_tokenizer)
    assert gen[0]["prompt"] == f"<|user|>{gen[0]['question']}<|end|><|assistant|>"
    cloze = benchmarks.cloze_rows(tiny_corpus, "prose", 5, 60, seed=0)
    assert len(cloze) == 5 and all(c["target"] == " scopes" and len(c["context"]) <= 60 for c in cloze)
    assert all(len(set(c["choices"])) == 4 and c["choices"][c["label"]] == " scopes" for c in cloze)
    assert all(o.startswith(" ") and o.strip().lower() != "scopes" for c in cloze for i, o in enumerate(c["choices"]) if i != c["label"])
    assert scoring.arith_gen_results({"answer": "68"}, [" 68"]) == {"exact_match": 1.0}
    assert scoring.arith_gen_results({"answer": "68"}, ["6"]) == {"exact_match": 0.0}


def test_extra_task_loading_is_bounded():
    class Hanging:  # a dataset download that never finishes
        def load(self, specs):
            time.sleep(30)

    class Broken:
        def load(self, specs):
            raise FileNotFoundError("no data here")

    start = time.perf_counter()
    assert "did not load within" in evaluate._load_within(Hanging(), "slow", timeout=0.2)
    assert time.perf_counter() - start < 5
    assert evaluate._load_within(Broken(), "x", timeout=5) == "FileNotFoundError: no data here"
