"""Every third-party module the code imports is declared in pyproject.toml, in the group that installs it where
that code runs: the library, the stages and the flow in `dependencies`; infra/ may use the `team` extra too,
bench/ the `bench` extra; tests/ run under `.[dev,team]` (what `make env` installs). A module that arrives only
as someone else's dependency can vanish with their next release; declared, it cannot."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"lmforge", "tasks", "flows", "infra", "bench", "tests"}
EXTRAS = {"lmforge": (), "tasks": (), "flows": (), "infra": ("team",), "bench": ("bench",), "tests": ("dev", "team")}
# scripts that run in an environment of their own: their imports must be pinned in its constraints file
OWN_ENV = {"lmforge/compress/worker.py": "lmforge/compress/constraints.txt"}


def pinned(constraints: Path) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in constraints.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def _optional(node: ast.Try) -> bool:
    """A try whose handlers catch ImportError: what it imports is optional, used only where installed."""
    for handler in node.handlers:
        caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(c, ast.Name) and c.id in ("ImportError", "ModuleNotFoundError") for c in caught):
            return True
    return False


def imported(path: Path) -> dict[str, int]:
    """Top-level names of the absolute imports in a file, at any depth (functions included) -> first line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _optional(t)
               for stmt in t.body for n in ast.walk(stmt)}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def declared(pyproject: dict, folder: str) -> set[str]:
    """Canonical names of the distributions pyproject.toml declares for code in `folder`; each needs a floor."""
    project = pyproject["project"]
    reqs = [*project["dependencies"], *(r for extra in EXTRAS[folder] for r in project["optional-dependencies"][extra])]
    names = set()
    for req in map(Requirement, reqs):
        assert any(spec.operator in (">=", "==", "~=", ">") for spec in req.specifier), f"{req}: no lower bound"
        names.add(canonicalize_name(req.name))
    return names


def undeclared(root: Path = ROOT, pyproject: dict | None = None) -> list[str]:
    pyproject = pyproject or tomllib.loads((root / "pyproject.toml").read_text())
    dists = packages_distributions()
    problems = []
    for folder in EXTRAS:
        allowed = declared(pyproject, folder)
        local = {p.stem for p in (root / folder).glob("*.py")}  # tests import conftest and each other
        for path in sorted((root / folder).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # infra/.venv-s3 (moto's own venv), infra/.stack
            rel = str(path.relative_to(root))
            if rel in OWN_ENV:
                own = pinned(root / OWN_ENV[rel])
                problems += [f"{rel}:{line} imports {name}, not pinned in {OWN_ENV[rel]}"
                             for name, line in imported(path).items() if name not in sys.stdlib_module_names
                             and canonicalize_name(name) not in own]
                continue
            for name, line in imported(path).items():
                if name in sys.stdlib_module_names or name in FIRST_PARTY or name in local:
                    continue
                provided = {canonicalize_name(d) for d in dists.get(name, [])}
                if not provided & allowed:
                    where = ", ".join(sorted(provided)) or "no installed distribution"
                    extras = "dependencies" + "".join(f" or [{e}]" for e in EXTRAS[folder])
                    problems.append(f"{path.relative_to(root)}:{line} imports {name} ({where}), "
                                    f"not declared in pyproject.toml's {extras}")
    return problems


def test_every_third_party_import_is_declared():
    problems = undeclared()
    assert not problems, "\n".join(problems)


def test_a_removed_declaration_is_named():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pyproject["project"]["dependencies"] = [r for r in pyproject["project"]["dependencies"]
                                            if canonicalize_name(Requirement(r).name) != "networkx"]
    assert any(p.startswith("flows/lifecycle.py:") and "imports networkx (networkx)" in p for p in undeclared(pyproject=pyproject))
