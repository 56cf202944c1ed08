"""The lifecycle flow: runs the DVC stages in DAG order under Prefect, one MLflow parent run per flow run.

Orchestration only: each stage runs as `dvc repro --single-item <stage>` (in-process DVC API), so
DVC decides what changed, caches and versions; unchanged stages are reported as skipped. The generation-bound
stages (SIDE_BY_SIDE) start two at a time on a CPU-only machine when neither reads the other's outputs.

    python -m flows.lifecycle                          # params.yaml as it is, all stages
    python -m flows.lifecycle --preset tiny            # write params.yaml from configs/tiny.yaml first
    python -m flows.lifecycle --stages pretrain        # pretrain and whatever it needs that changed
    python -m flows.lifecycle serve --cron "0 3 * * *" # serve a scheduled deployment from this process
    python -m flows.lifecycle --push team              # team stack: outputs to the DVC remote `team` too
    python -m flows.lifecycle --no-register            # no new registry versions (they are made by default)
    python -m flows.lifecycle --jobs 1                 # one stage at a time, each on every core
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import chdir
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FailedRun
from prefect.states import Failed

from flows import provenance, report
from flows.lock import Busy, project_lock
from lmforge import registry
from lmforge import tracking
from lmforge.errors import ConfigError
from lmforge.config import STAGES, load_params, read_yaml
from lmforge.cli.preset import apply as apply_preset
from lmforge.cli.preset import resolve as resolve_preset

# Headline figures per stage for the run summary (the report card has the rest).
HEADLINES = {
    "mix": ["total.docs_train", "total.chars_train"],
    "tokenizer": ["bytes_per_token.overall", "vocab_used_val"],
    "pretrain": ["n_params", "initial_val_loss", "final_val_loss", "tokens_per_s"],
    "distill": ["bits_per_byte.teacher", "bits_per_byte.student", "bits_per_byte.control"],
    "sft": ["base_accuracy", "final_accuracy"],
    "lora": ["final_accuracy", "trainable_share"],
    "reward": ["test_accuracy", "gt_agreement"],
    "ppo": ["gt_accuracy_before", "gt_accuracy", "rm_score", "kl_ref"],
    "dpo": ["gt_accuracy_before", "gt_accuracy", "pref_accuracy", "kl_ref"],
    "grpo": ["gt_accuracy_before", "gt_accuracy", "rm_score", "kl_ref"],
    "quantize": ["policy", "int8.size_ratio", "nf4.size_ratio", "gptq.loss_vs_rtn", "qat.loss_vs_rtn"],
    "evaluate": ["gate.passed"],
    "export": ["policy", "q8_0.size_ratio", "q8_0.top1_agreement"],
}


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def plan(root: Path, targets: list[str] | None) -> dict[str, set[str]]:
    """The targets and every stage they depend on, in DAG order (every stage in dvc.yaml when no targets), each
    with the stages among them whose outputs it reads."""
    import networkx as nx
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {getattr(s, "name", None): s for s in graph.nodes}
        unknown = [t for t in targets or [] if t not in by_name]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)} (dvc.yaml has: {', '.join(n for n in by_name if n)})")
        needed = set(targets or by_name)
        for name in targets or []:
            needed |= {getattr(s, "name", None) for s in nx.descendants(graph, by_name[name])}
        ordered = [by_name[n] for n in needed if n]
        # a topological order of the needed stages, ties broken by the canonical lifecycle order
        rank = {name: i for i, name in enumerate(STAGES)}
        sub = graph.subgraph(ordered).reverse()
        order = list(nx.lexicographical_topological_sort(sub, key=lambda st: rank.get(st.name, len(rank))))
        return {st.name: {up.name for up in sub.predecessors(st)} for st in order}


# Stages whose time goes to generating a few tokens at a time (rollouts, sampled replies, held-out answers) and to
# Python, not to large matmuls: two of them side by side, a thread each, finish sooner than one after the other on
# two threads (dpo and grpo on a 2-core CPU: 64 s against 83 s, the same figures; docs/findings/speed.md). A
# trainer of matmuls gains nothing so (pretrain on one thread runs at half its speed on two), so the others run
# alone, on every core.
SIDE_BY_SIDE = {"ppo", "dpo", "grpo"}


def side_by_side(launch, jobs: int | None) -> int:
    """How many stages of SIDE_BY_SIDE run at once: `jobs` (the command line's), else the launch section's, else by
    default two on a machine with two or more CPUs and no GPU (a thread each then), else one (a GPU, or torchrun
    workers, take the whole machine per stage). `launch`: params.yaml's launch section."""
    if jobs or launch.jobs:
        return max(1, jobs or launch.jobs)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") != "" and any(Path("/proc/driver/nvidia/gpus").glob("*"))
    several = launch.nproc_per_node * launch.nnodes > 1
    return 2 if len(os.sched_getaffinity(0)) >= 2 and not gpu and not several else 1


def bad_input(exc: BaseException | None) -> bool:
    """Whether DVC's error says the stage command exited 2: bad input, already reported in one line."""
    while isinstance(exc, BaseException):
        if "exited with 2" in str(exc):
            return True
        exc = exc.__cause__
    return False


def worth_retrying(task, task_run, state) -> bool:
    """Retry a failed stage (a flaky disk, a killed worker), but not one that exited 2: bad input stays bad."""
    return not bad_input(state.result(raise_on_failure=False))


def save_uncached(root: Path, stage: str) -> Path:
    """Copies of the stage's outputs that DVC does not cache (metrics, plots): DVC deletes every output before
    it runs the command, and only the cached ones can come back from the cache."""
    import shutil
    import tempfile

    saved = Path(tempfile.mkdtemp(prefix=f"lmforge-{stage}-outs-"))
    spec = read_yaml(root / "dvc.yaml").get("stages", {}).get(stage, {})  # plain YAML: no DVC repo opened per stage
    outs = [path for kind in ("outs", "metrics", "plots") for item in spec.get(kind) or [] if isinstance(item, dict)
            for path, opts in item.items() if isinstance(opts, dict) and opts.get("cache") is False]
    for rel in outs:
        if (root / rel).is_file():
            (saved / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, saved / rel)
    return saved


def restore_outputs(root: Path, stage: str, saved: Path) -> str:
    """After a failed or killed stage: its last good outputs back in the workspace (cached ones from the DVC
    cache as dvc.lock records them, the others from `saved`). Returns what stands now, for the summary."""
    import shutil

    from dvc.repo import Repo

    try:
        with chdir(root), Repo(".") as repo:
            repo.checkout(targets=[stage], force=True)
        what = f"the previous outputs of {stage} stand (restored from the DVC cache)"
    except Exception as err:  # noqa: BLE001 - never run to completion before, or a cache without them
        what = f"{stage} has no previous outputs to restore ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    for file in (p for p in saved.rglob("*") if p.is_file()):
        target = root / file.relative_to(saved)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    shutil.rmtree(saved, ignore_errors=True)
    return what


@task(name="dvc-repro", retries=1, retry_delay_seconds=5, retry_condition_fn=worth_retrying, task_run_name="{stage}")
def repro(root: str, stage: str, threads: int | None = None) -> dict:
    """Reproduce one stage if DVC sees a change; report whether it ran, and its dvc.lock entry's digest and data
    (read under DVC's lock: another stage running beside it may be writing dvc.lock). `threads`: the CPU threads
    its command gets (OMP_NUM_THREADS), while another stage runs beside it."""
    from dvc.repo import Repo

    logger = get_run_logger()
    start = time.perf_counter()
    run_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    try:
        # DVC releases its lock while the command runs and takes it again after: wait for it rather than fail,
        # as another stage (or someone's `dvc` command) may hold it then
        with chdir(root), Repo(".", _wait_for_lock=True) as repo:  # DVC resolves names and paths from the cwd
            ran = bool(repo.reproduce(stage, single_item=True, run_env=run_env))
            with repo.lock:
                made = {"lock": provenance.lock_hash(Path(root), stage), "datasets": provenance.datasets(Path(root), stage)}
    except Exception as err:
        if not bad_input(err):
            raise  # a crash: retried, and its traceback is worth reading
        # bad input: the stage printed its one `error:` line; a traceback here would only bury it
        logger.info("%s: stopped on bad input (exit code 2, not retried)", stage)
        return {"stage": stage, "ran": False, "seconds": round(time.perf_counter() - start, 2), "failed": "bad input"}
    seconds = round(time.perf_counter() - start, 2)
    logger.info("%s: %s in %.1fs%s", stage, "ran" if ran else "skipped (unchanged)", seconds,
                f" ({threads} thread{'s' if threads > 1 else ''}, beside another stage)" if threads and ran else "")
    return {"stage": stage, "ran": ran, "seconds": seconds, **made}


def summary(root: Path, results: list[dict], preset: str | None, run_id: str | None) -> str:
    """What this flow run did, stage by stage; a skipped stage says which earlier run made the outputs it kept."""
    from prefect.runtime import flow_run

    commit = tracking.git_commit(root)[:10] or "not a git checkout"
    lines = [
        "# lmforge lifecycle run",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by the flow run "
        f"`{flow_run.name or 'outside Prefect'}`: preset `{preset or 'params.yaml as is'}`, git `{commit}`, "
        f"MLflow run `{run_id or 'none (nothing ran, or tracking off)'}`.",
        "",
        "| stage | status | seconds | outputs from | headline metrics |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for r in results:
        metrics_file = root / "out" / r["stage"] / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        heads = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k in HEADLINES.get(r["stage"], [])
            if (v := _dig(metrics, k)) is not None
        )
        status = f"**failed** ({r['failed']})" if r.get("failed") else "ran" if r["ran"] else "skipped"
        made = "this run" if r["ran"] else provenance.origin(root, r["stage"])
        lines.append(f"| {r['stage']} | {status} | {r['seconds']:.1f} | {made} | {heads} |")
    return "\n".join(lines) + "\n"


@task(name="register-models")
def register_versions(root: str, run_id: str) -> registry.Decision:
    """New registry versions of the policy and its quantised variants; `champion` moves only if the policy wins."""
    decision = registry.register_and_promote(Path(root), run_id)
    get_run_logger().info("registry: %s", decision.reason)
    return decision


@task(name="dvc-push")
def dvc_push(root: str, remote: str) -> int:
    """Every cached output of the workspace to the DVC remote `remote`; returns how many files went up."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        pushed = repo.push(remote=remote)
    get_run_logger().info("dvc push -r %s: %d file(s) uploaded", remote, pushed)
    return pushed


@task(name="dvc-status")
def stale(root: str, order: list[str]) -> list[str]:
    """The stages among `order` that DVC would rebuild now (changed deps, params or missing outputs)."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        return sorted(repo.status(targets=order))


class StageFailed(Exception):
    """A stage failed and its last good outputs were put back; `summary_md` says which and what stands."""

    def __init__(self, message: str, results: list[dict], summary_md: Path, bad_input: bool):
        super().__init__(message)
        self.results, self.summary_md, self.bad_input = results, summary_md, bad_input


def run_stages(path: Path, needs: dict[str, set[str]], preset: str | None, experiment: str,
               register_models: bool = True, jobs: int = 1) -> tuple[list[dict], Path, Path]:
    """Reproduce the stages under one MLflow parent run, each once the stages it reads are done (up to `jobs` of
    SIDE_BY_SIDE at a time, each on its share of the cores; any other alone); register the models when asked and
    the evaluation is new; write the summary and the report card. Returns the results (in DAG order) and the two
    paths. A stage that fails or is interrupted gets its last good outputs back
    (StageFailed, or the interrupt), after the stages running beside it have finished."""
    import shutil

    from prefect.futures import as_completed

    os.environ[tracking.ROOT_ENV] = str(path)  # the flow and its stages share one MLflow store
    # Stage commands say `python`: make it this interpreter, whatever PATH the scheduler gave us.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    order = list(needs)
    cpus = len(os.sched_getaffinity(0))
    results: list[dict] = []
    locks: dict[str, str] = {}  # each ran stage's dvc.lock digest, read under DVC's lock when it finished
    report.preload()  # matplotlib's import (~2 s) happens while the first stage runs, not after the last
    with chdir(path), tracking.flow_run("lifecycle", experiment, {"preset": preset or "", "stages": ",".join(order)}) as parent:
        pending, running, done = list(order), {}, set()
        failure = None  # (stage, what stands of its outputs, its error) of the first stage that failed
        try:
            while pending or running:
                ready = [s for s in pending if needs[s] <= done] if not running and failure is None else []
                # The next stage alone on every core, or up to `jobs` of SIDE_BY_SIDE together, each on its share
                # of the cores; none joins a batch already running, where it would keep its one thread after the
                # others end (grpo on the real model: 420 s alone on one thread; docs/findings/smollm2.md).
                batch = [s for s in ready if s in SIDE_BY_SIDE][:jobs] if ready[:1] and ready[0] in SIDE_BY_SIDE \
                    else ready[:1]
                for stage in batch:
                    pending.remove(stage)
                    saved = save_uncached(path, stage)
                    threads = max(1, cpus // len(batch)) if len(batch) > 1 else None
                    running[stage] = (repro.submit(str(path), stage, threads), saved)
                if not running:
                    break
                finished = next(as_completed([future for future, _ in running.values()]))
                stage = next(name for name, (future, _) in running.items() if future is finished)
                _, saved = running.pop(stage)
                try:
                    result = finished.result()
                except BaseException as err:
                    result = {"stage": stage, "ran": False, "seconds": 0.0, "failed": type(err).__name__, "error": err}
                if result.get("failed"):
                    stands = restore_outputs(path, stage, saved)  # first: a tracking error must not cost the outputs
                    tracking.settle_stage_runs(parent, stage)  # a killed attempt's run is FAILED too
                    err = result.pop("error", None)
                    results.append(result)
                    if err is not None and not isinstance(err, Exception):
                        raise err  # interrupted: outputs back (the others' below), then stop as asked
                    if failure is None:
                        failure = (stage, stands, err)
                    continue
                shutil.rmtree(saved, ignore_errors=True)
                done.add(stage)
                made = {k: result.pop(k, None) for k in ("lock", "datasets")}
                results.append(result)
                parent.log_metrics({f"{stage}.seconds": result["seconds"], f"{stage}.ran": float(result["ran"])})
                if result["ran"]:
                    locks[stage] = made["lock"] or ""
                    tracking.settle_stage_runs(parent, stage, {"dvc.lock_md5": locks[stage]}, made["datasets"] or [])
        except BaseException:  # interrupted (Ctrl-C, a cancelled run): the running stages' last good outputs back
            for stage, (future, saved) in running.items():
                future.wait()
                restore_outputs(path, stage, saved)
                tracking.settle_stage_runs(parent, stage)  # a killed attempt's run is FAILED too
            raise
        results.sort(key=lambda r: order.index(r["stage"]))
        if failure is not None:
            stage, stands, err = failure
            parent.set_tags({"lmforge.failed_stage": stage})  # the parent run ends FAILED too
            why = "stopped on bad input (its error: line is above)" if err is None else \
                f"failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
            message = f"stage {stage} {why}; {stands}"
            raise StageFailed(message, results, write_summary(path, results, preset, None, message), err is None)
        card = write_card(path)
        note = None
        if register_models and any(r["ran"] and r["stage"] == "evaluate" for r in results) and parent.run_id:
            decision = register_versions(str(path), parent.run_id)
            parent.set_tags({"lmforge.champion": decision.champion, "lmforge.candidate": decision.version})
            note = f"registry: {decision.reason}"
        summary_md = write_summary(path, results, preset, parent.run_id, note)
        parent.log_artifact(summary_md)
        parent.log_artifact(card.parent, "report")
    provenance.record(path, {stage: {"lock": lock, "flow_run": parent.run_id,
                                     "stage_run": getattr(parent, "settled", {}).get(stage)}
                             for stage, lock in locks.items()})
    return results, summary_md, card


def write_summary(path: Path, results: list[dict], preset: str | None, run_id: str | None,
                  note: str | None = None) -> Path:
    """out/summary.md: what this flow run ran and skipped (and `note`: the registry's decision)."""
    (path / "out").mkdir(exist_ok=True)
    summary_md = path / "out" / "summary.md"
    # redacted: the note may quote an error, the summary becomes a Prefect artifact and an MLflow one
    summary_md.write_text(tracking.redact(summary(path, results, preset, run_id) + (f"\n{note}\n" if note else "")))
    return summary_md


def write_card(path: Path) -> Path:
    """The report card, redrawn only when the stages' outputs changed since it was drawn."""
    if not report.up_to_date(path):
        report.write(path)
    return report.card_path(path)


@flow(name="lifecycle", log_prints=True)
def lifecycle(preset: str | None = None, stages: list[str] | None = None, experiment: str = "lmforge",
              root: str = ".", register_models: bool = True, push: str | None = None, jobs: int | None = None) -> list[dict]:
    """Run the lifecycle's stages (or a subset and what it needs) through DVC, tracked in MLflow; with
    `register_models`, a new evaluation registers the models (lmforge/registry.py); with `push`, the outputs go to
    that DVC remote at the end of a successful run; `jobs`: stages at once (default: side_by_side)."""
    logger = get_run_logger()
    path = Path(root).resolve()
    # Bad input and failed stages end the run Failed with one line, not an exception: Prefect would print
    # its traceback ahead of the stage's own `error:` line
    with project_lock(path):  # one flow run per project at a time (re-entrant: the CLI may hold it already)
        try:
            if preset:
                apply_preset(preset, path / "params.yaml", path / "configs")
                logger.info("applied preset %s to params.yaml", preset)
            params = load_params(path / "params.yaml")  # every section valid before any stage starts
            needs = plan(path, stages)
            order = list(needs)
            todo = stale(str(path), order)
            if todo:
                results, summary_md, card = run_stages(path, needs, preset, experiment, register_models,
                                                       side_by_side(params["launch"], jobs))
        except ConfigError as err:
            logger.error("error: %s", tracking.redact(str(err)))
            return Failed(message=tracking.redact(f"error: {err}"))
        except StageFailed as err:
            logger.error("%s", tracking.redact(str(err)))
            card = report.card_path(path)
            create_markdown_artifact(err.summary_md.read_text() + ("\n" + card.read_text() if card.exists() else ""),
                                     key="lifecycle-report", description="the failed stage, and what stands")
            return Failed(message=tracking.redact(str(err)))
        if not todo:  # nothing to rebuild, so nothing to track: no MLflow run, no stage tasks
            logger.info("every stage is up to date (dvc status): nothing to run")
            results = [{"stage": s, "ran": False, "seconds": 0.0} for s in order]
            card, summary_md = write_card(path), write_summary(path, results, preset, None)
        if push:
            dvc_push(str(path), push)
    create_markdown_artifact(summary_md.read_text() + "\n" + card.read_text(), key="lifecycle-report",
                             description="stages run and skipped, and the report card (plots are in out/report/)")
    ran = [r["stage"] for r in results if r["ran"]]
    logger.info("ran: %s; skipped: %s", ", ".join(ran) or "none",
                ", ".join(r["stage"] for r in results if not r["ran"]) or "none")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.lifecycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=["run", "serve"])
    ap.add_argument("--preset", help="apply configs/<preset>.yaml to params.yaml first")
    ap.add_argument("--stages", nargs="*", help="stages to bring up to date (default: all)")
    ap.add_argument("--experiment", default="lmforge", help="MLflow experiment name")
    ap.add_argument("--root", default=".", help="project folder (holds dvc.yaml)")
    ap.add_argument("--cron", default="0 3 * * *", help="serve: schedule (cron, UTC)")
    ap.add_argument("--no-wait", action="store_true",
                    help="refuse (exit 2) instead of waiting when another run holds this project")
    ap.add_argument("--no-register", dest="register", action="store_false",
                    help="make no registry versions (by default a new evaluation registers the models)")
    ap.add_argument("--push", metavar="REMOTE", help="after a successful run, push the outputs to this DVC remote")
    ap.add_argument("--jobs", type=int, metavar="N",
                    help="ppo, dpo and grpo run at once, each with its share of the CPUs (default: params.yaml's "
                         "launch.jobs, whose 0 means 2 on a CPU-only machine with 2 or more CPUs, else 1)")
    args = ap.parse_args(argv)
    params = {"preset": args.preset, "stages": args.stages, "experiment": args.experiment, "root": args.root,
              "register_models": args.register, "push": args.push, "jobs": args.jobs}
    if args.command == "serve":
        lifecycle.serve(name="lifecycle-scheduled", cron=args.cron, parameters=params)
        return 0
    root = Path(args.root).resolve()
    try:
        # the project lock before Prefect starts: a queued run starts no engine and no ephemeral server
        with project_lock(root, wait=not args.no_wait):
            # bad params or preset: one line now, before Prefect starts a server only to report it
            resolve_preset(args.preset, root / "configs") if args.preset else load_params(root / "params.yaml")
            os.environ[tracking.ROOT_ENV] = str(root)  # the store the flow will use
            tracking.prestart(args.experiment)  # MLflow's writer starts up while Prefect does
            try:
                lifecycle(**params)
            finally:  # nothing ran, or the flow failed before its run: the writer has nothing to write
                tracking.discard_prestarted()
    except (ConfigError, Busy, tracking.Unreachable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FailedRun as err:  # the flow ended Failed: one line (a stage's own error: line came before it)
        text = str(err)
        print(text if text.startswith("error:") else f"lifecycle: {text}", file=sys.stderr)
        return 2 if text.startswith("error:") or "bad input" in text else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
