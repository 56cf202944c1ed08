"""The results: docs/benchmarks.md (the page every benchmark figure in the docs comes from) and a JSON file with
every number. Each row carries the run that measured it (date, commit, machine), so a run with `--only` can keep
the other rows of the previous results and the page still says, per row, where each figure comes from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.core import ROOT, Row, fmt

MET = {True: "yes", False: "**no**", None: "–"}
NOT_RECORDED = "not recorded"
FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
DOC = ROOT / "docs" / "benchmarks.md"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def git_commit(root: Path = ROOT) -> str:
    """`git rev-parse --short HEAD`, plus "-dirty" when tracked files differ from it; "not recorded" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return NOT_RECORDED
    return head + ("-dirty" if dirty else "")


def provenance(result: dict) -> dict:
    """The run a results file describes: its date, commit and machine (what each of its rows inherits)."""
    return {"created": result.get("created", NOT_RECORDED), "commit": result.get("commit") or NOT_RECORDED,
            "args": result.get("args", []), "machine": result.get("machine", {}), "load": result.get("load"),
            "noisy": result.get("noisy")}


def rows_with_runs(result: dict) -> list[dict]:
    """Rows of a results file, each with its "run" (rows written before runs were recorded per row get the file's)."""
    own = provenance(result)
    return [dict(r, run=r.get("run") or own) for r in result.get("rows", [])]


def cpu_features(m: dict) -> str:
    flags = m.get("cpu_flags")
    if flags is None:
        return NOT_RECORDED
    have = [label for flag, label in FEATURES if flag in flags]
    return ", ".join(have) or "none of AVX2, AVX-512, AVX512-BF16, AMX"


def machine_line(m: dict) -> str:
    if not m:
        return NOT_RECORDED
    cores = f"{m['usable_cpus']} usable CPUs of {m['logical_cpus']}"
    if m.get("physical_cores"):
        cores += f" ({m['physical_cores']} physical cores)"
    gpu = f"GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else "no GPU"
    mem = f", {m['memory_gb']} GiB RAM" if m.get("memory_gb") else ""
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    return (f"{m['cpu']}; CPU features: {cpu_features(m)}; {cores}{mem}, torch threads {m['torch_threads']}, {gpu}; "
            f"{m['os']}; Python {m['python']}; {versions}; TOKENIZERS_PARALLELISM={m['tokenizers_parallelism']}")


def _run_key(run: dict) -> str:
    return json.dumps([run.get("created"), run.get("commit"), run.get("machine")], sort_keys=True, default=str)


def _load(run: dict) -> str:
    load = run.get("load") or {}
    if load.get("start") is None:
        return NOT_RECORDED
    return f"{'**noisy** ' if run.get('noisy') else ''}{load['start']} → {load.get('end')}"


def _row_line(r: dict, label: str) -> str:
    row = Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__})
    if row.status != "ok":
        return (f"| {row.number} | {_cell(row.title)} | – | – | – | {row.target or '–'} | – | {label} | "
                f"{row.status}: {_cell(row.note)} |")
    base = fmt(row.baseline, row.unit) if row.baseline is not None else "–"
    if row.baseline_name:
        base = f"{base} ({row.baseline_name})" if row.baseline is not None else row.baseline_name
    return (f"| {row.number} | {_cell(row.title)} | {fmt(row.ours, row.unit)} | {_cell(base)} | {row.value_text} | "
            f"{row.target} | {MET[row.met]} | {label} | {_cell(row.note)} |")


def markdown(result: dict) -> str:
    """The benchmarks page. Values, ratios and met/missed come from the rows as the bench computed them."""
    rows = rows_with_runs(result)
    runs: dict[str, tuple[str, dict]] = {}
    for r in rows:
        key = _run_key(r["run"])
        if key not in runs:
            runs[key] = (chr(ord("A") + len(runs)), r["run"])
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `python -m bench` (`make bench`) from bench/results/latest.json; "
        "`python -m bench --render` rewrites it without measuring. Do not edit by hand. -->",
        "",
        "Each figure is measured against a baseline or a limit on the same machine in the same run; the ratio and "
        "whether the target is met are computed by the bench. `python -m bench --only ROW ...` re-measures some "
        "rows and keeps the others, so the **run** column says which run measured each row.",
        "",
        "| run | date | commit | command | load | machine |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, run in runs.values():
        command = f"`python -m bench {' '.join(run.get('args') or [])}`".replace(" `", "`")
        lines.append(f"| {label} | {run.get('created', NOT_RECORDED)} | {run.get('commit') or NOT_RECORDED} | "
                     f"{_cell(command)} | {_load(run)} | {_cell(machine_line(run.get('machine') or {}))} |")
    lines += ["", "Load is the load average at the start and end of the run; **noisy** means other work shared the "
              "machine, so that run's timings are pessimistic.", ""]
    lines += [
        "| # | figure | ours | baseline / limit | ratio | target | met | run | notes |",
        "| --- | --- | ---: | --- | ---: | --- | :-: | :-: | --- |",
    ]
    lines += [_row_line(r, runs[_run_key(r["run"])][0]) for r in rows]
    return "\n".join(lines) + "\n"


def write(result: dict, folder: Path, doc: Path | None = None) -> tuple[Path, Path]:
    """latest.json into `folder`, the page into `doc` (default: docs/benchmarks.md for the repository's own
    results folder, `folder`/benchmarks.md for any other)."""
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "latest.json"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(js, doc or default_doc(folder))
    return md, js


def default_doc(folder: Path) -> Path:
    return DOC if folder.resolve() == (ROOT / "bench" / "results").resolve() else folder / "benchmarks.md"


def render(results: Path, doc: Path) -> Path:
    """Rewrite the page from a results file, measuring nothing (`python -m bench --render`)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(json.loads(results.read_text())))
    return doc


def previous_result(folder: Path) -> dict:
    try:
        return json.loads((folder / "latest.json").read_text())
    except (OSError, ValueError):
        return {}


def previous_rows(folder: Path) -> dict[str, dict]:
    """Rows of the last results file, by key, each with its run (for figures carried forward)."""
    try:
        return {r["key"]: r for r in rows_with_runs(previous_result(folder))}
    except (KeyError, TypeError, AttributeError):
        return {}
