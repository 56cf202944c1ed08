"""The layout holds: tasks/ has the stage modules of dvc.yaml and nothing else; no stage imports another; the
library (lmforge/) imports no stage and has no import cycle; dvc.yaml's code `deps` of each stage are exactly
the lmforge modules it imports (transitively), derived here from the source, so they cannot drift."""

import ast
from pathlib import Path

import pytest

from lmforge.config import STAGES, read_yaml

ROOT = Path(__file__).resolve().parents[1]
# Modules that do not change what a stage computes, so editing them must not rebuild every output:
EXEMPT = {
    "tasks/__init__.py": "package marker",
    "lmforge/__init__.py": "package marker; sets a log filter",
    "lmforge/data/__init__.py": "package marker",
    "lmforge/training/__init__.py": "package marker",
    "lmforge/errors.py": "the error types a stage raises on bad input",
    "lmforge/config/__init__.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "lmforge/config/base.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "lmforge/config/data.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "lmforge/config/training.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "lmforge/config/evaluation.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "lmforge/stage.py": "the runner: argument parsing, staging and publishing, meta files",
    "lmforge/tracking.py": "MLflow bookkeeping",
    "lmforge/distributed.py": "process launch and collectives: N processes compute what one does (tests/test_distributed.py)",
}


def _module_file(name: str) -> str | None:
    """tasks.x / lmforge.x.y -> its file (or its package folder), relative to the project; None if not ours."""
    parts = name.split(".")
    if parts[0] not in ("tasks", "lmforge"):
        return None
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return str(path.with_suffix(".py").relative_to(ROOT))
    if (path / "__init__.py").is_file():  # a package: its __init__, or the whole folder where it holds data too
        has_data = any(f.suffix != ".py" for f in path.iterdir() if f.is_file())
        return str((path if has_data else path / "__init__.py").relative_to(ROOT))
    return None


def imports_of(rel: str) -> set[str]:
    """lmforge files a module (or every module of a package folder) imports, at any depth in its code."""
    path = ROOT / rel
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    found = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = _module_file(name)
                if target and target != rel and not target.startswith(rel + "/"):
                    found.add(target)
    return found


def code_deps(stage: str) -> set[str]:
    """Every lmforge module the stage's code reaches, its own module included, exempt ones left out."""
    start = f"tasks/{stage}.py"
    seen, todo = {start}, [start]
    while todo:
        for dep in imports_of(todo.pop()):
            if dep not in seen and dep not in EXEMPT:
                seen.add(dep)
                todo.append(dep)
    return seen


def dvc_code_deps(stage: str) -> set[str]:
    deps = read_yaml(ROOT / "dvc.yaml")["stages"][stage]["deps"]
    return {d for d in deps if d.startswith(("tasks/", "lmforge/"))}


def library_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lmforge").rglob("*.py"))


def test_tasks_holds_exactly_the_stage_modules():
    listed = set(read_yaml(ROOT / "dvc.yaml")["stages"])
    present = {p.stem for p in (ROOT / "tasks").iterdir() if p.name != "__init__.py" and p.name != "__pycache__"}
    assert present == listed == set(STAGES), f"tasks/ {sorted(present)} vs dvc.yaml {sorted(listed)}"


@pytest.mark.parametrize("module", library_files())
def test_no_library_module_imports_a_stage(module):
    stages = {d for d in imports_of(module) if d.startswith("tasks/")}
    assert not stages, f"{module} imports stage code {sorted(stages)}: move what it needs into lmforge/"


def test_no_import_cycle():
    """Cycles among modules, through imports at any depth of a module's code (functions included)."""
    graph = {f: {d for d in imports_of(f) if not d.endswith("__init__.py") and d.endswith(".py")}
             for f in library_files() + [f"tasks/{s}.py" for s in STAGES]}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_module_imports_another(stage):
    others = {f"tasks/{s}.py" for s in STAGES} - {f"tasks/{stage}.py"}
    assert not imports_of(f"tasks/{stage}.py") & others


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_the_imports(stage):
    derived, declared = code_deps(stage), dvc_code_deps(stage)
    assert not derived - declared, f"dvc.yaml stage {stage} misses deps: {sorted(derived - declared)}"
    assert not declared - derived, f"dvc.yaml stage {stage} lists code it does not import: {sorted(declared - derived)}"


def test_the_derivation_sees_function_level_imports():
    # evaluate imports lm-eval task builders inside functions; lora imports lowbit at module level
    assert "lmforge/lm_eval_tasks" in code_deps("evaluate")
    assert "lmforge/lowbit.py" in code_deps("lora")
    assert "tasks/sft.py" not in code_deps("lora")
