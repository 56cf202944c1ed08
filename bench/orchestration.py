"""Rows 5-6: what Prefect + DVC + MLflow cost on top of the work itself.

5.  The whole flow (`python -m flows.lifecycle`) on a pipeline whose stages are all cached, against a
    running Prefect server, vs a bare `dvc repro` of the same pipeline (both fresh interpreters).
5b. Prefect's own start-up, reported apart: import time, server start-up, ephemeral-server cost.
6.  Per stage: the marginal wall time of running one stage through the flow (flow with the stage
    re-run minus flow with it cached) vs `lmforge.stage.execute` of the same stage with a NullTracker.

Everything runs in a throw-away copy of the project on the tiny preset. To make DVC re-run a stage
without `--force` (the flow has no such switch), a harmless parameter of that stage is bumped, which
also keeps DVC's run cache from restoring the old outputs instead of running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.core import (BenchError, Context, Row, Skip, base_env, best_of, excess_row, log, run_cmd)
from flows import PREFECT_DEFAULTS
from infra.stack import free_port

PY = sys.executable
BUMP_KEYS = {"tokenizer": "max_train_chars"}  # the knob bumped to force a re-run; "seed" elsewhere


# ------------------------------------------------------------------------------------ prefect server
class PrefectServer:
    """`prefect server start` on a free loopback port, its state in a private PREFECT_HOME."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def env(self) -> dict[str, str]:
        return {"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def start(self, timeout: float = 300) -> float:
        env = base_env(PREFECT_HOME=str(self.home), PREFECT_API_URL=None, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        cmd = [str(Path(PY).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-ui", "--analytics-off"]
        start = time.perf_counter()
        with open(self.home / "server.log", "w") as logfile:
            # its own session, so stop() can end the server and its workers, and nothing else
            self.proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                tail = (self.home / "server.log").read_text().strip().splitlines()[-5:]
                raise BenchError(f"prefect server exited {self.proc.returncode}: " + " | ".join(tail))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.start_s = time.perf_counter() - start
                        return self.start_s
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise BenchError(f"prefect server not healthy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def prefect_server(ctx: Context) -> PrefectServer:
    def start():
        server = PrefectServer(ctx.workdir / "prefect-home")
        log(f"prefect server: starting on {server.url}")
        ctx.on_close(server.stop)
        seconds = server.start()
        log(f"prefect server: healthy after {seconds:.1f} s")
        return server

    return ctx.memo("prefect", start)


# --------------------------------------------------------------------------------------- the project
def dvc_stages(root: Path) -> list[str]:
    """Stages declared in the project's dvc.yaml, in lifecycle order."""
    from ruamel.yaml import YAML

    from lmforge.config import STAGES

    declared = (YAML(typ="safe", pure=True).load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    return [s for s in STAGES if s in declared] + [s for s in declared if s not in STAGES]


def stage_cmd(root: Path, stage: str) -> list[str]:
    from ruamel.yaml import YAML

    cmd = YAML(typ="safe", pure=True).load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    return shlex.split(cmd if isinstance(cmd, str) else " ".join(cmd))


def built_pipeline(ctx: Context) -> tuple[Path, list[str], str]:
    """The tiny-preset project with its stages run once by bare DVC (tracking off): (root, stages built,
    note on stages that could not be built). Stops at the first stage that fails."""

    def build():
        root = ctx.project("tiny")
        wanted = list(ctx.sizes.pipeline_stages or dvc_stages(root))
        wanted = [s for s in wanted if s in dvc_stages(root)]
        env = base_env(LMFORGE_TRACKING="off")
        built, note = [], ""
        for stage in wanted:
            log(f"pipeline: dvc repro {stage} (tiny preset)")
            try:
                run_cmd([PY, "-m", "dvc", "repro", "--single-item", stage], root, env, timeout=1800)
            except BenchError as err:
                note = f"stage {stage} failed to build ({err}); measured the {len(built)} stages before it"
                break
            built.append(stage)
        if not built:
            raise BenchError(note or "dvc.yaml declares no stages")
        return root, built, note

    return ctx.memo("pipeline", build)


def flow_env(ctx: Context) -> dict[str, str]:
    return base_env(LMFORGE_TRACKING="on", **prefect_server(ctx).env())


def flow_cmd(stages: list[str], all_stages: list[str]) -> list[str]:
    cmd = [PY, "-m", "flows.lifecycle"]
    return cmd if stages == all_stages else cmd + ["--stages", *stages]


def flow_status(root: Path) -> dict[str, tuple[str, float]]:
    """stage -> (ran|skipped, seconds) from the summary the flow just wrote."""
    out = {}
    for line in (root / "out" / "summary.md").read_text().splitlines():
        m = re.match(r"\|\s*(\w+)\s*\|\s*(ran|skipped)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            out[m.group(1)] = (m.group(2), float(m.group(3)))
    return out


# --------------------------------------------------------------------------------------------- rows
def flow_rows(ctx: Context) -> list[Row]:
    from lmforge.config import STAGES

    root, built, build_note = built_pipeline(ctx)
    env = flow_env(ctx)
    cmd = flow_cmd(built, list(STAGES))
    log("flow: warm-up run (creates the MLflow store and Prefect records)")
    first, _ = run_cmd(cmd, root, env)
    ran = [s for s, (status, _) in flow_status(root).items() if status == "ran"]
    if ran:
        raise BenchError(f"the flow re-ran {ran} on a cached pipeline: cannot time a cached run")

    def flow() -> float:
        return run_cmd(cmd, root, env)[0]

    def dvc() -> float:
        return run_cmd([PY, "-m", "dvc", "repro", *built], root, env)[0]

    flows, dvcs, tasks = [], [], []
    for i in range(ctx.sizes.timed_runs):  # alternating, so drifting load hits both alike
        log(f"flow vs dvc repro, cached: {i + 1}/{ctx.sizes.timed_runs}")
        flows.append(flow())
        tasks.append(sum(sec for _, sec in flow_status(root).values()))
        dvcs.append(dvc())
    best = flows.index(min(flows))
    note = (f"{len(built)} stages ({', '.join(built)}), tiny preset, MLflow tracking on, Prefect server on loopback; "
            f"fresh interpreters; best of {ctx.sizes.timed_runs}; inside the flow its tasks' DVC checks took "
            f"{tasks[best]:.2f} s, the rest is start-up, Prefect, MLflow and the report card; the first flow run "
            f"(creating the MLflow store) took {first:.1f} s")
    return [excess_row("5", "orchestration_overhead", "Whole flow, every stage cached (python -m flows.lifecycle)",
                       min(flows), min(dvcs), baseline_name="bare dvc repro", at_most=3.0,
                       note=note + (f"; {build_note}" if build_note else ""), flow_runs=flows, dvc_runs=dvcs,
                       task_seconds=tasks, first_run=first)]


_TRIVIAL_FLOW = """
import json, time
t0 = time.perf_counter()
from prefect import flow
@flow
def nothing():
    return 1
t1 = time.perf_counter()
nothing()
print(json.dumps({"import_s": t1 - t0, "flow_s": time.perf_counter() - t1}))
"""


def prefect_rows(ctx: Context) -> list[Row]:
    server = prefect_server(ctx)
    root = ctx.workdir
    env = base_env(PREFECT_HOME=str(server.home), PREFECT_API_URL=None)

    def python(code: str, extra: dict | None = None) -> float:
        return run_cmd([PY, "-c", code], root, {**env, **(extra or {})})[0]

    n = ctx.sizes.timed_runs
    bare, _ = best_of(n, lambda: python("pass"))
    imported, _ = best_of(n, lambda: python("import prefect"))

    def trivial(extra: dict) -> dict:
        return json.loads(run_cmd([PY, "-c", _TRIVIAL_FLOW], root, {**env, **extra})[1].strip().splitlines()[-1])

    log("prefect: trivial flow against the server and with an ephemeral one")
    served = min((trivial(server.env()) for _ in range(n)), key=lambda r: r["flow_s"])
    # the ephemeral server gets its own home; a first, untimed run creates its database, as a user's first run does
    # the flow's own settings: analytics off (its first-run session write raced the server's and locked SQLite)
    # and a start-up wait longer than Prefect's 20 s (a cold server missed it under load)
    alone = {"PREFECT_HOME": str(ctx.workdir / "prefect-ephemeral"), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
             **PREFECT_DEFAULTS}
    first = trivial(alone)
    ephemeral = min((trivial(alone) for _ in range(n)), key=lambda r: r["flow_s"])
    return [
        Row("5b", "prefect_import", "Prefect start-up: import prefect", ours=imported, baseline=bare, unit="s",
            baseline_name="python -c pass", value=imported - bare, value_text=f"{imported - bare:+.2f} s",
            target="report", note=f"best of {n} fresh interpreters"),
        Row("5c", "prefect_server_start", "Prefect start-up: `prefect server start` until healthy",
            ours=server.start_s, unit="s", value=server.start_s, value_text=f"{server.start_s:.1f} s", target="report",
            note="once per machine: the flow rows run against this server"),
        Row("5d", "prefect_ephemeral", "Prefect start-up: trivial flow with an ephemeral server",
            ours=ephemeral["flow_s"], baseline=served["flow_s"], unit="s", baseline_name="same flow, running server",
            value=ephemeral["flow_s"] - served["flow_s"], value_text=f"{ephemeral['flow_s'] - served['flow_s']:+.2f} s",
            target="report", note=f"what a run without PREFECT_API_URL pays for starting its own server; best of {n} "
                                  f"after a first run (which creates its database) of {first['flow_s']:.1f} s"),
    ]


def bump(params: Path, stage: str) -> str:
    """Raise one harmless knob of a stage in params.yaml by one; returns 'stage.key=value'."""
    key = BUMP_KEYS.get(stage, "seed")
    text = params.read_text()
    section = re.search(rf"^{re.escape(stage)}:\n((?:[ #].*\n|\n)*)", text, re.M)
    if not section:
        raise BenchError(f"params.yaml has no {stage} section")
    line = re.search(rf"^  {key}: (-?\d+)", section.group(1), re.M)
    if not line:
        raise Skip(f"{stage} has no integer knob {key!r} to bump for a forced re-run")
    value = int(line.group(1)) + 1
    start = section.start(1) + line.start(1)
    params.write_text(text[:start] + str(value) + text[section.start(1) + line.end(1):])
    return f"{stage}.{key}={value}"


_DIRECT = """
import json, sys, time
t0 = time.perf_counter()
import importlib
rc = importlib.import_module("tasks." + sys.argv[1]).main(sys.argv[2:])
print(json.dumps({"seconds": time.perf_counter() - t0, "rc": rc}))
"""


def direct_seconds(ctx: Context, root: Path, stage: str, tracked: bool = False) -> float:
    """The stage through `lmforge.stage.execute` with tracking off (its NullTracker), in a fresh interpreter,
    timed from before the stage module's import; its outputs go outside the project. `tracked`: the same
    with MLflow tracking on, to tell MLflow's share of the overhead."""
    argv = stage_cmd(root, stage)
    if argv[:3] != ["python", "-m", f"tasks.{stage}"]:
        raise Skip(f"dvc.yaml's {stage} command is not `python -m tasks.{stage} …`")
    target = ctx.workdir / f"direct-{stage}"
    args = [str(target) + a[len(f"out/{stage}"):] if a.startswith(f"out/{stage}") else a for a in argv[3:]]
    # tracked: the project's MLflow store, which the flow has created already (creating one takes long)
    env = base_env(LMFORGE_TRACKING="on" if tracked else "off", LMFORGE_ROOT=str(root), LMFORGE_JOURNAL=None)
    out = run_cmd([PY, "-c", _DIRECT, stage, *args], root, env)[1]
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"]:
        raise BenchError(f"direct run of {stage} exited {result['rc']}")
    return result["seconds"]


def stage_overhead_rows(ctx: Context) -> list[Row]:
    from lmforge.config import STAGES

    root, built, _ = built_pipeline(ctx)
    env = flow_env(ctx)
    rows = []
    for stage in ctx.sizes.overhead_stages:
        if stage not in built:
            rows.append(Row("6", f"stage_overhead.{stage}", f"Per-stage overhead: {stage}", status="skipped",
                            note=f"{stage} is not in the built pipeline ({', '.join(built)})"))
            continue
        cmd = flow_cmd([stage], list(STAGES))
        ran, cached, direct, tracked, inside, bumps = [], [], [], [], [], []
        untracked_ran, untracked_cached = [], []
        untracked = {**env, "LMFORGE_TRACKING": "off"}
        for i in range(ctx.sizes.timed_runs):
            bumps.append(bump(root / "params.yaml", stage))
            log(f"overhead {stage}: flow with {bumps[-1]} ({i + 1}/{ctx.sizes.timed_runs})")
            ran.append(run_cmd(cmd, root, env)[0])
            status = flow_status(root)
            if status.get(stage, ("",))[0] != "ran":
                raise BenchError(f"the flow did not re-run {stage} after {bumps[-1]}: {status}")
            inside.append(status[stage][1])
            cached.append(run_cmd(cmd, root, env)[0])
            log(f"overhead {stage}: the same with MLflow tracking off")
            bumps.append(bump(root / "params.yaml", stage))
            untracked_ran.append(run_cmd(cmd, root, untracked)[0])
            untracked_cached.append(run_cmd(cmd, root, untracked)[0])
            log(f"overhead {stage}: direct execute(), without and with MLflow")
            direct.append(direct_seconds(ctx, root, stage))
            tracked.append(direct_seconds(ctx, root, stage, tracked=True))
        marginal = [r - c for r, c in zip(ran, cached)]
        note = (f"flow with {stage} re-run minus flow with it cached, vs execute() + NullTracker in a fresh "
                f"interpreter "
                f"(same params); the flow's task timed dvc repro of {stage} at {min(inside):.2f} s; the same "
                f"execute() with MLflow tracking on took {min(tracked):.2f} s; best of {ctx.sizes.timed_runs}")
        rows.append(excess_row("6", f"stage_overhead.{stage}", f"Per-stage overhead: {stage}", min(marginal),
                               min(direct), baseline_name="lmforge.stage.execute, NullTracker", at_most=2.0, note=note,
                               flow_ran=ran, flow_cached=cached, direct=direct, direct_tracked=tracked,
                               task_seconds=inside, bumps=bumps))
        plain = [r - c for r, c in zip(untracked_ran, untracked_cached)]
        rows.append(excess_row("6u", f"stage_overhead_untracked.{stage}",
                               f"Per-stage overhead, MLflow tracking off: {stage}", min(plain), min(direct),
                               baseline_name="lmforge.stage.execute, NullTracker", at_most=2.0,
                               note="the same, LMFORGE_TRACKING=off for the flow: what Prefect and DVC cost alone; "
                                    "row 6 minus this is MLflow: the flow's run and the stage's own",
                               flow_ran=untracked_ran, flow_cached=untracked_cached, direct=direct))
    return rows
