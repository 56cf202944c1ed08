"""The model registry seam (MLflow 3 aliases; lmforge/tracking.py is the rest of the MLflow seam).

A flow run that made a new evaluation registers, as new versions with alias `candidate`, in whatever store it
tracks to (the embedded SQLite one of `make run` as well as the team server):

    lmforge        the final policy (the one the quantize stage chose: quantize.model) as a logged MLflow transformers
                   model of the flow's run (its Models column) with the chat task, the export stage's GGUF files,
                   Modelfile and model card in its `export/` folder: `mlflow.pyfunc.load_model("models:/lmforge@champion")` answers OpenAI-style chat
                   requests, and so does `mlflow models serve`; its `model/` and `components/tokenizer/`
                   folders load with plain transformers. A LoRA policy is registered merged (out/lora/model),
                   so no adapter has to find its base.
    lmforge-int8,  the quantised variants (out/quantize/<method>), plain transformers folders:
    lmforge-nf4    AutoModelForCausalLM.from_pretrained(mlflow.artifacts.download_artifacts("models:/lmforge-int8@champion"))

Each version carries its lineage as tags: git commit, dvc.lock digest, the data's DVC hash, the gate metric
and every evaluation metric of the policy. `champion` moves to the candidate only when the candidate beats the
champion on the gate metric (evaluate.gate_metric, read from out/evaluate/table.json); otherwise it stays and
the returned Decision says why. Promotion is safe against concurrent flow runs: the champion is always the
best version measured on the gate metric (the older one on a tie), and each promoter re-reads after it writes
until the alias agrees, so the last writer cannot leave a worse version in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge import tracking
from lmforge.config import load_params

POLICY = "lmforge"
CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "lmforge."  # prefix of lineage tags


@dataclass(frozen=True)
class Decision:
    version: str  # the candidate's version of POLICY
    champion: str  # the champion's version after promotion
    promoted: bool
    reason: str
    versions: dict[str, str]  # registered model -> the version this run registered


def lineage(root: Path) -> dict[str, str]:
    """Where a model comes from: the commit, a digest of dvc.lock, the DVC hash of the mixed corpus."""
    lock_file = root / "dvc.lock"
    lock_text = lock_file.read_text() if lock_file.exists() else ""
    data = ""
    if lock_text:
        from ruamel.yaml import YAML

        stages = (YAML(typ="safe", pure=True).load(lock_text) or {}).get("stages", {})
        data = next((o.get("md5", "") for o in stages.get("mix", {}).get("outs", [])
                     if o.get("path") == "out/mix/corpus"), "")
    return {f"{TAG}git_commit": tracking.git_commit(root), f"{TAG}dvc_lock_md5": hashlib.md5(lock_text.encode()).hexdigest(),
            f"{TAG}data_md5": data}


def gate(root: Path) -> tuple[str, str, float, bool, dict[str, float]]:
    """(policy variant, gate metric, its value, higher is better, every metric of the policy) from the evaluation."""
    params = load_params(root / "params.yaml")
    variant, metric = params["quantize"].model, params["evaluate"].gate_metric
    if variant == "best":  # the quantize stage chose, and says which
        variant = json.loads((root / "out" / "quantize" / "metrics.json").read_text())["policy"]
    table = json.loads((root / "out" / "evaluate" / "table.json").read_text())
    row = table["rows"].get(variant, {})
    if metric not in row:
        raise ValueError(f"registry: no {metric!r} for {variant!r} in out/evaluate/table.json (evaluate.variants "
                         f"must include {variant!r})")
    higher = table.get("higher_is_better", {}).get(metric)
    return variant, metric, float(row[metric]), higher is not False, row


def _log_policy(client, run_id: str, folder: Path, tags: dict[str, str], export: Path | None) -> str:
    """The policy as a logged MLflow transformers model (chat task) of `run_id`, shown in the run's Models column;
    requirements pinned to what made it; with the export stage's files of the same policy (`export/`: GGUF,
    Modelfile, model card) among its artifacts. Returns its `models:/<id>` URI."""
    import mlflow
    import mlflow.transformers
    import torch
    import transformers
    from mlflow.entities import LoggedModelOutput
    from transformers import AutoModelForCausalLM, AutoTokenizer

    components = {"model": AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False),
                  "tokenizer": AutoTokenizer.from_pretrained(folder, trust_remote_code=False)}
    experiment = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment, POLICY, run_id, model_type="llm/v1/chat",
                                       tags={k: v for k, v in tags.items() if k.startswith(TAG)})
    mlflow.set_tracking_uri(tracking.tracking_uri())
    # explicit requirements: inferring them would load the model again in a subprocess
    mlflow.transformers.log_model(components, name=POLICY, task="llm/v1/chat", model_id=model.model_id,
                                  pip_requirements=[f"transformers=={transformers.__version__}",
                                                    f"torch=={torch.__version__.split('+')[0]}", "accelerate"])
    if export is not None:
        client.log_model_artifacts(model.model_id, str(export), "export")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_uri


def register(root: Path, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """Log the policy and the quantised variants under `run_id`, register each as a new version with alias
    `candidate` and lineage tags. Returns (registered model -> version, the tags)."""
    client = tracking._client()
    variant, metric, value, higher, row = gate(root)
    tags = {**lineage(root), f"{TAG}policy": variant, f"{TAG}gate_metric": metric, f"{TAG}gate_value": repr(value),
            f"{TAG}higher_is_better": str(higher), **{f"metric.{k}": repr(v) for k, v in row.items()}}
    artifact_root = client.get_run(run_id).info.artifact_uri
    export = root / "out" / "export"
    made = json.loads((export / "metrics.json").read_text()).get("policy") if (export / "metrics.json").exists() else None
    sources = {POLICY: _log_policy(client, run_id, root / "out" / variant / "model", tags,
                                   export if made == variant else None)}
    for method in ("int8", "nf4"):  # plain transformers folders, logged as the run's artifacts
        if (folder := root / "out" / "quantize" / method / "config.json").exists():
            client.log_artifacts(run_id, str(folder.parent), f"registry/{POLICY}-{method}")
            sources[f"{POLICY}-{method}"] = f"{artifact_root}/registry/{POLICY}-{method}"
    versions = {}
    for name, source in sources.items():
        _ensure_model(client, name)
        # the variants name their policy's version: their champion follows it (_follow)
        own = tags if name == POLICY else {**tags, f"{TAG}policy_version": versions[POLICY]}
        # a logged model's version names it (a tracking server checks that the source belongs to it)
        mv = client.create_model_version(name, source, run_id=run_id, tags=own,
                                         description=f"lmforge {variant} policy, run {run_id}",
                                         model_id=source.removeprefix("models:/") if name == POLICY else None)
        client.set_registered_model_alias(name, CANDIDATE, mv.version)
        versions[name] = str(mv.version)  # a str from a server, an int from a local store
    return versions, tags


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:  # made by an earlier run, or by a concurrent one a moment ago
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _value(mv) -> float | None:
    raw = mv.tags.get(f"{TAG}gate_value")
    return float(raw) if raw is not None else None


def best(client, metric: str, higher: bool) -> str | None:
    """The version of POLICY with the best gate value on `metric` (the older one on a tie)."""
    scored = [mv for mv in client.search_model_versions(f"name='{POLICY}'", max_results=10000)
              if mv.tags.get(f"{TAG}gate_metric") == metric and _value(mv) is not None]
    if not scored:
        return None
    sign = 1.0 if higher else -1.0
    return str(max(scored, key=lambda mv: (sign * _value(mv), -int(mv.version))).version)


def champion(client, name: str = POLICY):
    """The champion version of `name`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(versions: dict[str, str], tags: dict[str, str]) -> Decision:
    """Move `champion` to this run's versions if its policy beats the champion on the gate metric."""
    client = tracking._client()
    mine, metric = str(versions[POLICY]), tags[f"{TAG}gate_metric"]
    higher = tags[f"{TAG}higher_is_better"] == "True"
    before = champion(client)
    variants = [n for n in versions if n != POLICY]
    # MLflow has no compare-and-set on aliases, so a promoter that read the versions before a better one was
    # registered may write a stale champion. Each promoter therefore writes best() and re-reads until the aliases
    # agree with it: the last writer always re-reads after its own write, when every version is visible.
    for _ in range(50):  # a bound, not a wait: concurrent promoters settle in a few passes
        target = best(client, metric, higher)
        current = champion(client)
        settled = current is not None and str(current.version) == target
        if not settled:
            client.set_registered_model_alias(POLICY, CHAMPION, target)
        if _follow(client, variants, target) and settled:  # nothing written in this pass: all agree
            break
    else:
        raise RuntimeError(f"registry: the champion alias of {POLICY!r} did not settle on v{target}")
    final = current
    promoted = str(final.version) == mine
    value = float(tags[f"{TAG}gate_value"])
    if promoted:
        reason = (f"v{mine} is champion: {metric} {value:.4g} beats v{before.version}'s {_value(before):.4g}"
                  if before is not None and _value(before) is not None else f"v{mine} is the first champion ({metric} {value:.4g})")
    else:
        reason = (f"champion stays v{final.version}: candidate v{mine} {metric} {value:.4g} does not beat "
                  f"{_value(final):.4g}")
    client.set_model_version_tag(POLICY, mine, f"{TAG}promotion", reason)
    return Decision(mine, str(final.version), promoted, reason, versions)


def _follow(client, names: list[str], policy_version: str) -> bool:
    """Point each variant's champion at its version made with the champion policy; True if all already were."""
    agreed = True
    for name in names:
        made = sorted((int(mv.version) for mv in client.search_model_versions(f"name='{name}'", max_results=10000)
                       if mv.tags.get(f"{TAG}policy_version") == policy_version))
        current = champion(client, name)
        if made and (current is None or int(current.version) != made[0]):
            client.set_registered_model_alias(name, CHAMPION, str(made[0]))
            agreed = False
    return agreed


def register_and_promote(root: Path, run_id: str) -> Decision:
    versions, tags = register(root, run_id)
    return promote(versions, tags)


def main(argv: list[str] | None = None) -> int:
    """Register a finished run's outputs by hand: python -m lmforge.registry RUN_ID [--root DIR]."""
    ap = argparse.ArgumentParser(prog="python -m lmforge.registry", description=main.__doc__)
    ap.add_argument("run_id", help="the MLflow run the models are logged under (the flow's parent run)")
    ap.add_argument("--root", default=".", help="project folder (holds out/ and params.yaml)")
    args = ap.parse_args(argv)
    decision = register_and_promote(Path(args.root).resolve(), args.run_id)
    print(json.dumps(decision.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
