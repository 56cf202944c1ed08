"""Secrets in the environment (tokens, keys, passwords in URIs) never reach what lmforge writes: outputs and
their lmforge.json, MLflow's params, tags and artifacts, or the messages it prints."""

from __future__ import annotations

import json
from pathlib import Path

from tasks import mix
from lmforge import tracking

TOKEN = "hf_FAKEtoken4lmforgeTests0123"
AWS = "AWSfakeSecretKey+lmforge/9876543210"
PG_PASSWORD = "pg-Passw0rd-lmforge"
SECRETS = (TOKEN, AWS, PG_PASSWORD)


def _plant(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://alice:{PG_PASSWORD}@db.internal:5432/lm")


def test_redact_masks_uri_credentials_and_secret_values(monkeypatch):
    _plant(monkeypatch)
    text = f"see http://bob:hunter2-xyz@mlflow.internal:5000/x and {TOKEN}, {PG_PASSWORD}; port 5000 stays"
    assert tracking.redact({"a": [text]}) == {"a": ["see http://***@mlflow.internal:5000/x and ***, ***; port 5000 stays"]}
    assert tracking.redact(3e-4) == 3e-4  # numbers untouched


def test_no_secret_reaches_outputs_mlflow_or_logs(monkeypatch, tmp_path, capfd):
    """One cheap stage (mix over a local file) tracked in a file-based MLflow store, with secrets planted in the
    environment and one inside a knob (a folder named after the token): every file written is searched."""
    _plant(monkeypatch)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here too
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / "inputs" / f"data-{TOKEN}"
    data.mkdir(parents=True)
    for i in range(20):
        (data / f"note{i}.txt").write_text(f"Note {i}: the build reads the manifest and writes a report. " * 4)
    params = tmp_path / "inputs" / "params.yaml"  # the user's own files, where the secret is theirs to keep
    params.write_text(json.dumps({"mix": {"budget_chars": 20000, "sources": [{"kind": "files", "path": str(data)}]}}))
    assert mix.main(["--params", str(params), "--out", str(tmp_path / "out" / "mix")]) == 0
    printed = capfd.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file() and "inputs" not in p.relative_to(tmp_path).parts]
    assert any(p.name == "lmforge.json" for p in written) and (tmp_path / "mlflow.db").is_file()
    assert any("mlruns" in p.parts for p in written)  # the stage's artifacts went to the store
    for secret in SECRETS:
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} leaked into {leaks}"
        assert secret not in printed.out + printed.err
    meta = json.loads((tmp_path / "out/mix/corpus/lmforge.json").read_text())
    assert meta["config"]["sources"][0]["path"].endswith("data-***")  # masked, the rest kept


def test_credentials_in_an_unreachable_tracking_uri_stay_out_of_the_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LMFORGE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-lmforge@127.0.0.1:9")
    (tmp_path / "notes.txt").write_text("A note long enough to keep. " * 20)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"mix": {"sources": [{"kind": "files", "path": str(tmp_path / "notes.txt")}]}}))
    assert mix.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI http://***@127.0.0.1:9 is unreachable" in err and "s3cret-lmforge" not in err
