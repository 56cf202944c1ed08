"""Integration: the real flow on the tiny preset in a temp project with real git, DVC, Prefect and MLflow."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from lmforge.config import STAGES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(lifecycle_project):
    return lifecycle_project


@pytest.fixture()
def tracked(monkeypatch, project):
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LMFORGE_ROOT", str(project))  # restored after the test; the flow sets it too
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + ":" + __import__("os").environ["PATH"])


def _statuses(results):
    return {r["stage"]: r["ran"] for r in results}


@pytest.fixture(scope="module")
def first_run(lifecycle_run):
    return lifecycle_run


def test_first_run_runs_every_stage_and_outputs_load(project, first_run):
    assert all(_statuses(first_run).values()), first_run
    assert [r["stage"] for r in first_run] == [s for s in STAGES if (project / "out" / s / "metrics.json").exists()]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(project / "out/tokenizer/tokenizer")
    assert tok.decode(tok("1 + 2 = 3").input_ids) == "1 + 2 = 3"
    model = AutoModelForCausalLM.from_pretrained(project / "out/pretrain/model")
    ids = tok("def ", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5

    metrics = json.loads((project / "out/pretrain/metrics.json").read_text())
    assert metrics["final_val_loss"] < metrics["initial_val_loss"] - 0.5
    meta = json.loads((project / "out/pretrain/model/lmforge.json").read_text())
    assert meta["config"]["max_steps"] == metrics_cfg(project)["pretrain"]["max_steps"]
    assert (project / "out/summary.md").read_text().count("| ran |") == len(first_run)


def metrics_cfg(project):
    from lmforge.config import load_params

    return {k: v.model_dump() for k, v in load_params(project / "params.yaml").items()}


def test_mlflow_has_parent_and_nested_stage_runs(project, first_run, tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "lifecycle"]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {r["stage"] for r in first_run}
    pre = children["pretrain"]
    assert pre.info.status == "FINISHED"
    assert pre.data.params["lr"] == str(metrics_cfg(project)["pretrain"]["lr"])
    assert pre.data.metrics["final_val_loss"] < pre.data.metrics["initial_val_loss"]
    assert len(client.get_metric_history(pre.info.run_id, "train_loss")) >= 3  # a curve, not a point
    assert re.fullmatch(r"[0-9a-f]{32}", pre.data.tags["dvc.lock_md5"])

    from flows.lifecycle import SIDE_BY_SIDE, plan, side_by_side
    from lmforge.config import load_params

    span = {name: (run.info.start_time, run.info.end_time) for name, run in children.items()}
    for stage, reads in plan(project, None).items():  # a stage starts once the stages it reads have finished
        assert all(span[stage][0] >= span[up][1] for up in reads), (stage, reads, span)
    launch = load_params(project / "params.yaml")["launch"]
    if side_by_side(launch, None) > 1:  # and stages that do not read each other's outputs ran side by side,
        pairs = [(a, b) for a in span for b in span if a < b and span[a][0] < span[b][1] and span[b][0] < span[a][1]]
        assert pairs and all({a, b} <= SIDE_BY_SIDE for a, b in pairs), span  # only those of SIDE_BY_SIDE,
        for a, b in pairs:  # a pair at a time: none joined a pair already running
            for c in set(span) - {a, b}:
                assert span[c][0] >= max(span[a][1], span[b][1]) or span[c][1] <= min(span[a][0], span[b][0]), \
                    (a, b, c, span)
    assert pre.data.tags["lmforge.git_commit"]
    assert pre.data.tags["lmforge.pid"] == parents[0].data.tags["lmforge.pid"]  # the flow's writer wrote both
    assert pre.data.tags["lmforge.process"] != parents[0].data.tags["lmforge.process"]  # journalled by the stage
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    # the data each stage read: dataset inputs whose digests are DVC's hashes in dvc.lock
    lock = __import__("yaml").safe_load((project / "dvc.lock").read_text())["stages"]
    corpus = next(d["md5"] for d in lock["sft"]["deps"] if d["path"] == "out/mix/corpus").removesuffix(".dir")
    inputs = {d.dataset.name: d for d in children["sft"].inputs.dataset_inputs}
    assert inputs["mix corpus"].dataset.digest == corpus and "built-in tasks" in inputs
    assert [t.value for t in inputs["mix corpus"].tags if t.key == "mlflow.data.context"] == ["training"]
    assert {d.dataset.name for d in children["evaluate"].inputs.dataset_inputs} >= {"mix corpus", "lm-eval tasks"}
    assert len(client.get_metric_history(children["sft"].info.run_id, "eval/loss")) >= 3  # evaluated while training


def test_embedded_store_registers_the_champion_as_the_runs_model(project, first_run, tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    champion = client.get_model_version_by_alias("lmforge", "champion")
    assert "first champion" in champion.tags["lmforge.promotion"]
    parent = client.get_run(champion.run_id)
    assert parent.info.run_name == "lifecycle"
    # the run's Models column: the policy is a logged model of the flow's run, and the version points at it
    (output,) = parent.outputs.model_outputs
    assert champion.source == f"models:/{output.model_id}"
    assert client.get_logged_model(output.model_id).source_run_id == parent.info.run_id
    for variant in ("lmforge-int8", "lmforge-nf4"):
        assert client.get_model_version_by_alias(variant, "champion").run_id == parent.info.run_id
    mlflow.set_tracking_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/lmforge@champion"))
    assert (folder / "MLmodel").exists() and (folder / "components" / "tokenizer").is_dir()
    # the export stage's files of the same policy travel with the version
    assert (folder / "export" / "gguf" / "lmforge-q8_0.gguf").stat().st_size > 10_000
    assert (folder / "export" / "README.md").read_text().startswith("---\nlicense: other")
    # what `make serve-model` and `make chat` load by default
    from lmforge.serving import Engine

    engine = Engine("models:/lmforge@champion")
    reply = engine.reply([{"role": "user", "content": "What is 2 + 3?"}], max_tokens=4)
    assert reply.prompt_tokens > 5 and reply.finish_reason in ("stop", "length")


def test_export_writes_gguf_a_modelfile_and_a_card_with_intervals(project, first_run):
    import yaml

    export = project / "out" / "export"
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["policy"] == json.loads((project / "out/quantize/metrics.json").read_text())["policy"]
    for kind in ("f16", "q8_0"):
        assert (export / "gguf" / f"lmforge-{kind}.gguf").stat().st_size == metrics[kind]["bytes"]
        assert metrics[kind]["top1_agreement"] >= (1.0 if kind == "f16" else 0.9)
    assert metrics["q8_0"]["bytes"] < metrics["f16"]["bytes"]
    assert (export / "Modelfile").read_text().startswith("FROM ./gguf/lmforge-q8_0.gguf\nTEMPLATE")
    card = (export / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    results = meta["model-index"][0]["results"]
    assert any(r["task"]["name"] == "arith_gen" and "95% CI" in r["metrics"][0]["name"] for r in results)
    assert "| arith_gen.exact_match" in card and "ollama create lmforge -f Modelfile" in card


def test_second_run_skips_everything(project, first_run, tracked):
    from flows.lifecycle import lifecycle

    card = project / "out/report/report.md"
    made = card.stat().st_mtime_ns
    results = lifecycle(root=str(project), experiment="lmforge")
    assert not any(_statuses(results).values()), results
    assert card.stat().st_mtime_ns == made  # nothing new to report: the card is kept, not redrawn
    text = (project / "out/summary.md").read_text()
    assert text.count("| skipped |") == len(results)
    # each cached stage names the run that made the outputs it kept: the first run's stage run
    origins = json.loads((project / "out/origins.json").read_text())
    sft = next(o for o in origins.values() if o["stage"] == "sft")
    assert re.search(rf"\| sft \| skipped \| [0-9.]+ \| cached: made .* by MLflow run `{sft['stage_run']}`", text), text


def test_changed_param_reruns_its_stage_and_downstream_only(project, first_run, tracked):
    from flows.lifecycle import lifecycle

    params = project / "params.yaml"
    text = params.read_text()
    section = text.index("\ngrpo:")
    new = text[:section] + text[section:].replace("  lr: 5e-05", "  lr: 4e-05", 1)
    assert new != text
    params.write_text(new)
    status = _statuses(lifecycle(root=str(project), experiment="lmforge"))
    # upstream stages and grpo's siblings (ppo and dpo read the same policy and reward model) are cached; grpo and
    # everything that reads its output re-run
    assert not any(status[s] for s in ("mix", "base", "tokenizer", "pretrain", "distill", "sft", "lora", "reward",
                                       "ppo", "dpo"))
    assert all(status[s] for s in ("grpo", "quantize", "evaluate", "export"))


def test_report_card_is_written_with_plots(project, first_run):
    card = (project / "out/report/report.md").read_text()
    for heading in ("## Wall time per stage", "## Data mixture", "## Tokenizer", "## Pretraining",
                    "## Alignment: PPO vs DPO vs GRPO", "Gain over base on the same items"):
        assert heading in card
    assert "Quantised and handed on: **" in card
    for png in ("walltime.png", "mixture.png", "pretrain_loss.png", "alignment_accuracy.png", "grpo_curves.png",
                "evaluate_tradeoff.png", "quantize_tradeoff.png"):
        assert (project / "out/report" / png).stat().st_size > 1000
        assert f"({png})" in card


def test_bad_input_fails_fast_without_retry_and_keeps_the_previous_outputs(project, first_run, tracked, capfd, caplog):
    from flows.lifecycle import lifecycle

    params = project / "params.yaml"
    good = params.read_text()
    bad = good.replace("  sources:", "  sources:\n    - {name: notes, kind: files, path: missing/notes.jsonl}", 1)
    assert bad != good
    params.write_text(bad)
    try:
        with pytest.raises(Exception, match="mix"):
            lifecycle(root=str(project), experiment="lmforge", stages=["mix"])
    finally:
        params.write_text(good)
    err = capfd.readouterr()
    text = err.out + err.err
    assert "missing/notes.jsonl" in text  # the stage's own one-line message reaches the user
    # DVC logs through Prefect's handlers, so its lines land in the log records, not on the captured fds
    assert caplog.text.count("Running stage 'mix'") == 1  # exit code 2 is not retried
    assert (project / "out/mix/corpus").is_dir()  # DVC deleted it to run mix; the flow put the last good one back
    assert not list((project / "out").glob(".*staging*"))
