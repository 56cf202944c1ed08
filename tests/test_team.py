"""Integration: the team stack for real on loopback (PostgreSQL, moto's S3 server, MLflow and Prefect servers, a
process worker), brought up once for the module from the project's own infra code, then:

  the tiny lifecycle as a run of the infra/prefect.yaml deployment, picked up by the worker; runs, artifacts and
  registry versions in the MLflow server, outputs pushed to the DVC remote on S3;
  a colleague's clone of the same commit pulls and is up to date without running anything, then compares a change;
  two clones run flows at once against the same servers (on `mix tokenizer`: two whole lifecycles do not fit the
  test budget), and two registrations race; neither clobbers the other, and the champion stays put;
  the champion serves a chat request (`mlflow models serve`);
  a failing stage is a FAILED flow run in Prefect and a FAILED run in MLflow naming the stage;
  a planted password shows up nowhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lmforge.config import STAGES
from conftest import commit_project

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.team]
PLANTED = "planted-" + secrets.token_hex(8)  # the PostgreSQL password: it must never show
EXPERIMENT = "team-it"
# the tiny preset, shorter still where it only costs time here: the stack is under test, not the models
SHORTER = [("pretrain", "max_steps", 30), ("sft", "max_steps", 8), ("lora", "max_steps", 8), ("ppo", "steps", 2),
           ("reward", "train_pairs", 32), ("dpo", "max_steps", 2), ("grpo", "max_steps", 2),
           ("quantize", "model", '"ppo"'), ("evaluate", "variants", '["base", "ppo"]'), ("evaluate", "mc_questions", 20),
           ("evaluate", "cloze_items", 20), ("evaluate", "gen_questions", 10)]


def _sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _make_project(dest: Path) -> Path:
    """A git + DVC project of this commit's code on the tiny preset, committed: what a team member clones."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("tasks", "lmforge", "flows", "configs"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    (dest / "infra").mkdir()
    for name in ("dvc.yaml", ".gitignore", "infra/prefect.yaml"):
        shutil.copy(ROOT / name, dest / name)
    from lmforge.cli.preset import apply

    apply("tiny", dest / "params.yaml", dest / "configs")
    for section, key, value in SHORTER:
        _set_param(dest, section, key, value)
    return commit_project(dest, _sh)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from infra import prereqs, stack as infra

    try:  # the set-up installed them (`make test` runs `python -m infra prereqs` first): here they are only checked
        prereqs.ensure(install=False)
    except prereqs.Missing as err:
        pytest.fail(f"team stack prerequisites missing (install: python -m infra prereqs): {err}", pytrace=False)
    project = _make_project(tmp_path_factory.mktemp("alice") / "lmforge")
    # PostgreSQL runs as its own OS user when we are root: its folder must be reachable (pytest's tmp is 0700)
    folder = Path(tempfile.mkdtemp(prefix="lmforge-stack-"))
    folder.chmod(0o755)
    saved = dict(os.environ)
    os.environ.update({"LMFORGE_PG_PASSWORD": PLANTED, "LMFORGE_S3_ACCESS_KEY": "it-access",
                       "LMFORGE_S3_SECRET_KEY": "it-" + secrets.token_hex(8)})
    s = infra.Stack(folder, root=project)
    t0 = time.monotonic()
    try:
        infra.up(s)
        s.startup_s = time.monotonic() - t0
        yield s
    finally:
        infra.down(s)
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def client_env(stack):
    from infra import credentials

    return {**stack.client_env(credentials.credentials(stack.root)), "LMFORGE_TRACKING": "on",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture()
def team(monkeypatch, client_env):
    """This process as a client of the stack (MLflow client, Prefect client, DVC)."""
    for k, v in client_env.items():
        monkeypatch.setenv(k, v)


def _mlflow(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.url("mlflow"))


def _run_deployment(stack, parameters: dict, timeout: float = 600):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.url("prefect") + "/api"}):
        return run_deployment("lifecycle/nightly", parameters=parameters, timeout=timeout, poll_interval=2)


@pytest.fixture(scope="module")
def scheduled_run(stack):
    """The tiny lifecycle as a run of the nightly deployment, executed by the worker in Alice's checkout."""
    t0 = time.monotonic()
    flow_run = _run_deployment(stack, {"experiment": EXPERIMENT})
    return flow_run, time.monotonic() - t0


def _s3_keys(stack, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    keys, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_stack_reports_every_component_up(stack):
    from infra import stack as infra

    assert infra.status(stack) == {name: True for name in infra.COMPONENTS}
    assert all(1024 < port < 65536 for port in stack.ports.values())
    assert (stack.folder / "env").stat().st_mode & 0o077 == 0  # it holds the S3 keys
    out = _sh(ROOT, sys.executable, "-m", "infra", "status", "--folder", str(stack.folder))
    assert f"mlflow    up    {stack.ports['mlflow']}" in out
    print(f"stack start-up: {stack.startup_s:.1f} s")


def test_worker_runs_the_deployment_into_the_shared_stores(stack, scheduled_run, team):
    flow_run, seconds = scheduled_run
    print(f"tiny lifecycle through the worker: {seconds:.1f} s")
    assert flow_run.state.is_completed(), flow_run.state
    # the deployment keeps its nightly schedule
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterStateType
    from prefect.client.schemas.sorting import FlowRunSort

    with temporary_settings(updates={PREFECT_API_URL: stack.url("prefect") + "/api"}):
        with get_client(sync_client=True) as prefect:
            deployment = prefect.read_deployment_by_name("lifecycle/nightly")
            scheduled = prefect.read_flow_runs(  # what the server's scheduler queued for the worker
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=dict(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)  # explicit: this server refuses nulls
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert scheduled and {(r.expected_start_time.hour, r.expected_start_time.minute) for r in scheduled} == {(3, 0)}

    client = _mlflow(stack)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    parent = next(r for r in runs if r.info.run_name == "lifecycle")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED" and {r.info.status for r in children.values()} == {"FINISHED"}
    assert set(children) == set(STAGES)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server to S3
    keys = _s3_keys(stack, "lmforge-mlflow")
    # the policy is a logged model of the flow's run, the export stage's GGUF files among its artifacts
    assert any(re.search(r"models/m-[0-9a-f]+/artifacts/MLmodel$", k) for k in keys), keys
    assert any(re.search(r"models/m-[0-9a-f]+/artifacts/export/gguf/lmforge-q8_0\.gguf$", k) for k in keys)
    assert any("report.md" in k for k in keys)

    # registry: version 1 of the policy and of each quantised variant, candidate and champion, with lineage
    head = _sh(stack.root, "git", "rev-parse", "HEAD").strip()
    mv = client.get_model_version_by_alias("lmforge", "champion")
    assert client.get_model_version_by_alias("lmforge", "candidate").version == mv.version == "1"
    assert mv.run_id == parent.info.run_id and mv.tags["lmforge.git_commit"] == head
    assert len(mv.tags["lmforge.dvc_lock_md5"]) == 32 and mv.tags["lmforge.data_md5"]
    assert mv.tags["lmforge.gate_metric"] == "arith_gen.exact_match" and "metric.arith_mc.acc" in mv.tags
    assert "first champion" in mv.tags["lmforge.promotion"]
    for variant in ("lmforge-int8", "lmforge-nf4"):
        assert client.get_model_version_by_alias(variant, "champion").run_id == parent.info.run_id
    # DVC outputs were pushed: the remote holds everything the workspace has
    assert _s3_keys(stack, "lmforge-dvc")
    assert "in sync" in _sh(stack.root, "dvc", "status", "--cloud", "--remote", "team", env=team_env(stack))


def team_env(stack) -> dict:
    from infra import credentials

    return {**stack.client_env(credentials.credentials(stack.root)), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "LMFORGE_TRACKING": "off"}


@pytest.fixture(scope="module")
def bob(stack, scheduled_run, tmp_path_factory):
    """Alice commits the run (dvc.lock, metrics); Bob clones that commit, points DVC at the stack and pulls."""
    from infra import stack as infra

    assert scheduled_run[0].state.is_completed()
    _sh(stack.root, "git", "add", "-A")
    _sh(stack.root, "git", "commit", "-qm", "tiny run")
    clone = tmp_path_factory.mktemp("bob") / "lmforge"
    _sh(clone.parent, "git", "clone", "-q", str(stack.root), str(clone))
    infra.remote(stack, clone)
    _sh(clone, "dvc", "pull", "-q", "--remote", "team", env=team_env(stack))
    return clone


def test_a_clone_of_the_commit_pulls_and_is_up_to_date(bob, stack):
    assert "Data and pipelines are up to date" in _sh(bob, "dvc", "status", env=team_env(stack))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(bob / "out/ppo/model").num_parameters() > 0


def _set_param(project: Path, section: str, key: str, value) -> None:
    text = (project / "params.yaml").read_text()
    at = text.index(f"\n{section}:")
    line = next(l for l in text[at:].splitlines() if l.startswith(f"  {key}:"))
    (project / "params.yaml").write_text(text[:at] + text[at:].replace(line, f"  {key}: {value}", 1))


def test_two_clones_run_at_once_and_registrations_race(bob, stack, team):
    """Alice and Bob each change the mix and run `mix tokenizer` at the same moment against the same servers,
    each pushing to the remote; meanwhile two registrations of Alice's (unchanged) models race."""
    from lmforge import registry

    _set_param(stack.root, "mix", "arithmetic_docs", 1400)
    _set_param(bob, "mix", "arithmetic_docs", 1300)
    cmd = [sys.executable, "-m", "flows.lifecycle", "--stages", "mix", "tokenizer", "--push", "team",
           "--experiment", "team-concurrent"]
    procs = [subprocess.Popen(cmd, cwd=p, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **team_env(stack), "LMFORGE_TRACKING": "on"})
             for p in (stack.root, bob)]
    client = _mlflow(stack)
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, run_name="race").info.run_id
    racers = [subprocess.Popen([sys.executable, "-m", "lmforge.registry", run_id], cwd=stack.root, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **team_env(stack)})
              for _ in range(2)]
    raced = [r.communicate(timeout=300) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], "\n\n".join(err[-3000:] for _, err in raced)
    decisions = [registry.Decision(**json.loads(out.splitlines()[-1])) for out, _ in raced]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    # registrations: two new versions, neither lost; an equal candidate does not beat the champion, which stays
    assert sorted(d.version for d in decisions) == ["2", "3"]
    assert all(not d.promoted and "champion stays v1" in d.reason and "does not beat" in d.reason for d in decisions)
    assert client.get_model_version_by_alias("lmforge", "champion").version == "1"
    assert client.get_model_version_by_alias("lmforge", "candidate").version in {"2", "3"}
    assert "does not beat" in client.get_model_version("lmforge", "2").tags["lmforge.promotion"]

    # two flow runs, two MLflow parents each with its own finished stage runs
    runs = client.search_runs([client.get_experiment_by_name("team-concurrent").experiment_id])
    parents = [r for r in runs if r.info.run_name == "lifecycle"]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    for p in parents:
        kids = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id)
        assert kids == ["mix", "tokenizer"], kids
    # both pushes landed: each clone's outputs are all on the remote, and they differ
    for clone in (stack.root, bob):
        assert "in sync" in _sh(clone, "dvc", "status", "--cloud", "--remote", "team", "mix", "tokenizer",
                                env=team_env(stack))
    alice_lock, bob_lock = ((c / "dvc.lock").read_text() for c in (stack.root, bob))
    assert alice_lock != bob_lock
    # Bob compares his change with the commit he cloned
    diff = _sh(bob, "dvc", "metrics", "diff", "--json", env=team_env(stack))
    assert "out/mix/metrics.json" in json.loads(diff)


def test_champion_answers_a_chat_request_when_served(stack, scheduled_run):
    from infra.stack import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.url("mlflow"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # it starts uvicorn from PATH
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/lmforge@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        request = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4}
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stdout.read() if server.poll() is not None else "no answer in 120 s"
        choice = (answer[0] if isinstance(answer, list) else answer)["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def test_a_failing_stage_fails_the_flow_run_and_its_mlflow_runs(stack, bob):
    """A bad mix source in Alice's checkout: the worker's flow run ends FAILED, naming the stage, and so do the
    MLflow runs (after the clone was taken: the colleague's test needs the good commit)."""
    params = stack.root / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("  sources:", "  sources:\n    - {name: notes, kind: files, path: missing.jsonl}", 1))
    try:
        flow_run = _run_deployment(stack, {"experiment": "team-fail", "stages": ["mix"]})
    finally:
        params.write_text(good)
    assert flow_run.state.is_failed()
    assert "mix" in flow_run.state.message
    client = _mlflow(stack)
    runs = client.search_runs([client.get_experiment_by_name("team-fail").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "lifecycle")
    assert parent.info.status == "FAILED" and parent.data.tags["lmforge.failed_stage"] == "mix"
    assert [r.info.status for r in runs if r.info.run_name == "mix"] == ["FAILED"]


def test_the_planted_password_shows_nowhere(stack, scheduled_run, bob):
    leaks = [str(p) for folder in (stack.folder / "logs", stack.root / "out", bob)
             for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
             and PLANTED.encode() in p.read_bytes()]
    assert not leaks
    client = _mlflow(stack)
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            assert PLANTED not in json.dumps({**run.data.params, **run.data.tags})
    ps = subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True).stdout
    assert PLANTED not in ps  # not on any server's command line
