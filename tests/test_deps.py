"""Stage modules are recipes: none imports another, and dvc.yaml's code `deps` of each stage are exactly the
lmforge modules it imports (transitively), derived here from the source, so they cannot drift."""

import ast
from pathlib import Path

import pytest

from tasks.config import STAGES, read_yaml

ROOT = Path(__file__).resolve().parents[1]
# Modules that do not change what a stage computes, so editing them must not rebuild every output:
EXEMPT = {
    "tasks/__init__.py": "package marker; sets a log filter",
    "tasks/config.py": "knob schema: a knob's value reaches a stage through params.yaml, which DVC tracks per section",
    "tasks/stage.py": "the runner: argument parsing, staging and publishing, meta files",
    "tasks/tracking.py": "MLflow bookkeeping",
    "tasks/distributed.py": "process launch and collectives: N processes compute what one does (tests/test_distributed.py)",
}


def _module_file(name: str) -> str | None:
    """tasks.x.y -> its file (or its package folder), relative to the project; None if not lmforge code."""
    parts = name.split(".")
    if parts[0] != "tasks" or len(parts) == 1:  # the package itself: its __init__ is exempt
        return None
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return str(path.with_suffix(".py").relative_to(ROOT))
    if (path / "__init__.py").is_file():
        return str(path.relative_to(ROOT))
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
    return {d for d in deps if d.startswith("tasks/")}


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
    assert "tasks/benchmarks" in code_deps("evaluate")
    assert "tasks/lowbit.py" in code_deps("lora")
    assert "tasks/sft.py" not in code_deps("lora")
