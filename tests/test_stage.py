"""The shared stage runner: validation first, atomic publication, metrics and meta files."""

import json

import pytest

from lmforge.config import TokenizerConfig
from lmforge.errors import InputError
from lmforge.stage import META_FILE, cli, execute, write_meta
from lmforge.tracking import NullTracker, flatten


def _ok(cfg, *, out, tracker, data):
    (out / "artifact").mkdir()
    (out / "artifact" / "weights.bin").write_bytes(b"x" * 10)
    write_meta(out / "artifact", "tokenizer", cfg, {"score": 1.0}, {"data": data})
    return {"score": 1.0, "nested": {"a": 2}}


def _fails_midway(cfg, *, out, tracker, data):
    (out / "artifact").mkdir()
    (out / "artifact" / "half.bin").write_bytes(b"x")
    raise InputError("corpus is empty after filtering")


def test_success_publishes_outputs_with_metrics_and_meta(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hi")
    metrics = execute("tokenizer", _ok, TokenizerConfig(), tmp_path / "out", {"data": data}, tracker=NullTracker())
    assert metrics["score"] == 1.0 and metrics["wall_time_s"] >= 0
    assert json.loads((tmp_path / "out/metrics.json").read_text())["nested"] == {"a": 2}
    meta = json.loads((tmp_path / "out/artifact" / META_FILE).read_text())
    assert meta["config"]["vocab_size"] == TokenizerConfig().vocab_size and meta["inputs"]["data"] == str(data)
    assert not list(tmp_path.glob("out/.*staging*")) and not list(tmp_path.glob(".*staging*"))


def test_failure_leaves_no_partial_output_and_keeps_previous(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hi")
    execute("tokenizer", _ok, TokenizerConfig(), tmp_path / "out", {"data": data}, tracker=NullTracker())
    with pytest.raises(InputError):
        execute("tokenizer", _fails_midway, TokenizerConfig(), tmp_path / "out", {"data": data}, tracker=NullTracker())
    assert not (tmp_path / "out/artifact/half.bin").exists()
    assert (tmp_path / "out/artifact/weights.bin").exists()  # the last complete result is untouched
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_missing_input_fails_before_work(tmp_path):
    with pytest.raises(InputError, match=r"missing data: .*absent.txt does not exist"):
        execute("tokenizer", _ok, TokenizerConfig(), tmp_path / "out", {"data": tmp_path / "absent.txt"}, tracker=NullTracker())
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_params_in_one_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("tokenizer:\n  vocab_size: many\n")
    code = cli("tokenizer", _ok, inputs=("data",), argv=["--params", str(params), "--data", str(params), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer.vocab_size" in err and "'many'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_flatten_nested_params():
    flat = flatten({"a": {"b": 1}, "sources": [{"name": "x"}, {"name": "y"}], "l": [1, 2]})
    assert flat == {"a.b": 1, "sources.0.name": "x", "sources.1.name": "y", "l": [1, 2]}
