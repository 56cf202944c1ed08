"""The results: a markdown table for the README and a JSON file with every number."""

from __future__ import annotations

import json
from pathlib import Path

from bench.core import Row, fmt

MET = {True: "yes", False: "**no**", None: "–"}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def machine_line(m: dict) -> str:
    cores = f"{m['usable_cpus']} usable CPUs of {m['logical_cpus']}"
    if m.get("physical_cores"):
        cores += f" ({m['physical_cores']} physical cores)"
    gpu = f"GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else "no GPU"
    mem = f", {m['memory_gb']} GiB RAM" if m.get("memory_gb") else ""
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return (f"{m['cpu']}, {cores}{mem}, torch threads {m['torch_threads']}, {gpu}; {m['os']}; Python {m['python']}; "
            f"{versions}; TOKENIZERS_PARALLELISM={m['tokenizers_parallelism']}")


def markdown(result: dict) -> str:
    m = result["machine"]
    load = result["load"]
    lines = [
        "# lmforge benchmarks",
        "",
        f"One run of `python -m bench {' '.join(result['args'])}`".rstrip() + f" on {result['created']}, "
        f"sizes `{result['sizes']['name']}`, {result['duration_s']:.0f} s in all.",
        "",
        f"Machine: {machine_line(m)}.",
        "",
    ]
    if result.get("noisy"):
        lines += [f"**Noisy:** load average {load['start']} at the start and {load['end']} at the end on "
                  f"{m['usable_cpus']} CPUs: other work shared the machine, so timings are pessimistic.", ""]
    lines += [
        "| # | figure | ours | baseline / limit | ratio | target | met | notes |",
        "| --- | --- | ---: | --- | ---: | --- | :-: | --- |",
    ]
    for r in result["rows"]:
        row = Row(**r)
        if row.status != "ok":
            lines.append(f"| {row.number} | {_cell(row.title)} | – | – | – | {row.target or '–'} | – | "
                         f"{row.status}: {_cell(row.note)} |")
            continue
        base = fmt(row.baseline, row.unit) if row.baseline is not None else "–"
        if row.baseline_name:
            base = f"{base} ({row.baseline_name})" if row.baseline is not None else row.baseline_name
        lines.append(f"| {row.number} | {_cell(row.title)} | {fmt(row.ours, row.unit)} | {_cell(base)} | "
                     f"{row.value_text} | {row.target} | {MET[row.met]} | {_cell(row.note)} |")
    return "\n".join(lines) + "\n"


def write(result: dict, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "latest.md", folder / "latest.json"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md.write_text(markdown(result))
    return md, js


def previous_rows(folder: Path) -> dict[str, dict]:
    """Rows of the last results file, by key (for figures carried forward rather than re-measured)."""
    path = folder / "latest.json"
    try:
        return {r["key"]: r for r in json.loads(path.read_text()).get("rows", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
