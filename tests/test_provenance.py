"""Where outputs come from, read off dvc.lock: dataset inputs with DVC's hashes, and the run that made a cached stage."""

from __future__ import annotations

import yaml

from flows import provenance

LOCK = {"schema": "2.0", "stages": {
    "sft": {"cmd": "python -m tasks.sft", "deps": [
        {"path": "lmforge/data/posttrain_data.py", "md5": "a" * 32, "size": 10},
        {"path": "out/mix/corpus", "md5": "b" * 32 + ".dir", "size": 20, "nfiles": 2},
        {"path": "out/pretrain/model", "md5": "c" * 32 + ".dir", "size": 30, "nfiles": 3},
        {"path": "tasks/sft.py", "md5": "d" * 32, "size": 40}]},
    "evaluate": {"cmd": "python -m tasks.evaluate", "deps": [
        {"path": "lmforge/lm_eval_tasks", "md5": "e" * 32 + ".dir", "size": 5, "nfiles": 1}]}}}


def _project(tmp_path, lock=LOCK):
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    return tmp_path


def test_datasets_are_the_data_deps_with_dvc_hashes_as_digests(tmp_path):
    root = _project(tmp_path)
    sft = {d["name"]: d for d in provenance.datasets(root, "sft")}
    assert set(sft) == {"mix corpus", "built-in tasks"}  # the model and the code are not data
    assert sft["mix corpus"] == {"name": "mix corpus", "digest": "b" * 32, "source": "out/mix/corpus",
                                 "context": "training"}
    assert [(d["name"], d["context"]) for d in provenance.datasets(root, "evaluate")] == [("lm-eval tasks", "evaluation")]
    assert provenance.datasets(root, "mix") == []


def test_a_cached_stage_names_the_run_that_made_its_outputs(tmp_path):
    root = _project(tmp_path)
    assert "made outside a flow run recorded here" in provenance.origin(root, "sft")
    digest = provenance.lock_hash(root, "sft")
    provenance.record(root, {"sft": {"lock": digest, "flow_run": "f1", "stage_run": "s1"}})
    assert "by MLflow run `s1`, flow run `f1`" in provenance.origin(root, "sft")
    # another entry (a changed dep) is another output: the record does not vouch for it
    changed = yaml.safe_load(yaml.safe_dump(LOCK))
    changed["stages"]["sft"]["deps"][1]["md5"] = "f" * 32 + ".dir"
    _project(tmp_path, changed)
    assert "made outside a flow run recorded here" in provenance.origin(root, "sft")
    assert provenance.origin(root, "reward") == "no outputs yet"


def test_a_damaged_record_only_makes_the_summary_vaguer(tmp_path):
    root = _project(tmp_path)
    (root / "out").mkdir()
    (root / provenance.ORIGINS).write_text("{not json")
    assert "made outside a flow run recorded here" in provenance.origin(root, "sft")
    provenance.record(root, {"sft": {"lock": provenance.lock_hash(root, "sft"), "flow_run": "f2"}})
    assert "flow run `f2`" in provenance.origin(root, "sft")
