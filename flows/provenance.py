"""Where a stage's outputs come from, read off dvc.lock: the digest of its entry, the data it read (MLflow dataset
inputs, DVC's hashes as digests), and, for a stage DVC skipped, the earlier flow run that made the outputs it kept.

A flow run records, per stage it ran, the digest of the stage's dvc.lock entry and the MLflow runs that made it
in `out/origins.json` (beside out/summary.md, not versioned: it describes this checkout's runs). A skipped stage's
entry digest finds its maker there; DVC's run cache can bring back older outputs, and their entry finds the run
that made them just the same.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

ORIGINS = Path("out") / "origins.json"
# the data a stage can read, by its dvc.lock path, with a readable name; models and tokenizers are not data
DATASETS = {
    "out/mix/corpus": "mix corpus",  # train and held-out splits
    "lmforge/data/posttrain_data.py": "built-in tasks",  # conversations, preference pairs and prompts it generates
    "lmforge/lm_eval_tasks": "lm-eval tasks",
}
EVALUATING = {"quantize", "evaluate"}  # stages that read the data only to measure


def _entry(root: Path, stage: str) -> dict | None:
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    from ruamel.yaml import YAML

    return (YAML(typ="safe", pure=True).load(lock.read_text()) or {}).get("stages", {}).get(stage)


def lock_hash(root: Path, stage: str) -> str:
    """A digest of the stage's dvc.lock entry (its deps, params and outs hashes)."""
    entry = _entry(root, stage)
    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest() if entry else ""


def datasets(root: Path, stage: str) -> list[dict]:
    """The data `stage` read, as MLflow dataset inputs: name, DVC's hash as the digest, the path as the source."""
    context = "evaluation" if stage in EVALUATING else "training"
    return [{"name": DATASETS[dep["path"]], "digest": dep.get("md5", "").removesuffix(".dir"), "source": dep["path"],
             "context": context}
            for dep in (_entry(root, stage) or {}).get("deps", []) if dep.get("path") in DATASETS]


def _read(root: Path) -> dict:
    try:
        return json.loads((root / ORIGINS).read_text())
    except (OSError, ValueError):  # none yet, or a file cut short: a missing record only makes the summary vaguer
        return {}


def record(root: Path, made: dict[str, dict]) -> None:
    """Remember who made each ran stage's outputs: {stage: {"lock": digest, "flow_run": id, "stage_run": id}}."""
    origins = _read(root)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for stage, who in made.items():
        if who.get("lock"):
            origins[who["lock"]] = {"stage": stage, "at": stamp, **{k: v for k, v in who.items() if k != "lock"}}
    (root / ORIGINS).parent.mkdir(exist_ok=True)
    tmp = root / ORIGINS.with_suffix(".tmp")
    tmp.write_text(json.dumps(origins, indent=1, sort_keys=True))
    tmp.replace(root / ORIGINS)


def origin(root: Path, stage: str) -> str:
    """For a skipped stage: which earlier run made the outputs it kept, in a few words for the summary."""
    digest = lock_hash(root, stage)
    if not digest:
        return "no outputs yet"
    who = _read(root).get(digest)
    if not who:
        return f"made outside a flow run recorded here (dvc.lock entry {digest[:8]})"
    stage_run = f"MLflow run `{who['stage_run']}`, " if who.get("stage_run") else ""
    return f"cached: made {who['at']} by {stage_run}flow run `{who.get('flow_run') or 'untracked'}`"
