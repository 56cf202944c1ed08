"""Where the mix stage's text comes from. Each kind yields raw documents lazily, in a seeded order, so
the caller can stop reading once it has enough (the standard library alone is ~10 MB of source).

    pydoc       English prose shipped with Python: the help() reference topics (pydoc_data), then the
                docstrings of standard-library modules, classes and functions, one document per module
    stdlib      source code of the standard library (.py files; tests, site-packages, demos left out)
    arithmetic  generated equations, questions with answers (a share in the post-training tasks' exact wording,
                copy lines included) and word problems (seeded)
    files       local .txt (one document per file), .jsonl (one per line, field text_field) or .parquet
                (column text_field): a file, a directory (searched recursively) or a glob
    hf          a Hugging Face dataset, streamed; only with mix.allow_network

`open_source` validates a source completely (paths exist, every JSONL row parses, columns exist, the
network is allowed) and returns its reader, so bad input fails before any heavy work.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import random
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from lmforge.config import MixConfig, SourceConfig
from lmforge.errors import InputError

Reader = Callable[[], Iterator[str]]
SUFFIXES = (".txt", ".jsonl", ".parquet")
# not representative library code: tests, third-party packages, demos, bundled wheels, and the pydoc
# topics (already the pydoc source)
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__",
               "pydoc_data", "ensurepip"}


def source_rng(cfg: MixConfig, src: SourceConfig, purpose: str) -> random.Random:
    """A generator per source and purpose: adding a source does not change another's order."""
    return random.Random(f"{cfg.seed}:{src.name}:{purpose}")  # str seeds hash with SHA-512: stable


# ------------------------------------------------------------------------------------------ built-in
def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-")]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _read_py(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _module_name(path: Path) -> str:
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_help(path: Path) -> str:
    """A module's docstrings laid out like `help(module)`: its own, then each public class and function's."""
    try:
        tree = ast.parse(_read_py(path))
    except (SyntaxError, ValueError):
        return ""
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(f"Help on module {_module_name(path)}:\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_") and node.name != "__init__":
                continue
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    sections.append(f"class {prefix}{node.name}\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif doc:
                sections.append(f"{prefix}{node.name}({ast.unparse(node.args)})\n{doc}")

    visit(tree.body, "")
    return "\n\n".join(sections)


def _pydoc(cfg: MixConfig, src: SourceConfig) -> Iterator[str]:
    from pydoc_data.topics import topics

    rng = source_rng(cfg, src, "read")
    names = sorted(topics)
    rng.shuffle(names)
    yield from (topics[name] for name in names)
    # the topics are ~0.5 MB; module docstrings extend the prose (parsed lazily: only as many as needed)
    files = stdlib_files()
    rng.shuffle(files)
    yield from filter(None, map(_module_help, files))


def _stdlib(cfg: MixConfig, src: SourceConfig) -> Iterator[str]:
    files = stdlib_files()
    source_rng(cfg, src, "read").shuffle(files)
    yield from map(_read_py, files)


NAMES = ["Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lena", "Mia", "Noah"]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "shells", "cards", "stamps", "eggs"]
HEADINGS = ["", "", "Arithmetic practice.", "Addition and subtraction:", "Questions and answers.",
            "Times tables:", "Some sums:", "Word problems.", "Check the answers:"]


# words for the plain-text copy lines (a superset of posttrain_data.WORDS)
COPY_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "star", "rain",
              "snow", "milk", "bread", "apple", "river", "stone", "cloud", "light", "house", "road", "ship", "hat",
              "cup", "door", "key", "box", "pen", "lamp", "ring", "leaf", "rose", "bear", "frog", "boat", "bell",
              "table", "chair", "window", "garden", "water", "fire", "wind", "hill", "sand", "gold", "glass", "rock")


def _qa_line(rng: random.Random, top: int) -> str:
    """A question in the exact wording of one of the post-training tasks, then its answer.

    The copy line puts the answer on its own line, so its first word is the same token as in the quoted
    question (a leading space would make it a different token) and as in a chat answer.
    """
    a, b = rng.randint(0, top), rng.randint(0, top)
    hi, lo = max(a, b), min(a, b)
    x, y = rng.randint(1, min(12, top)), rng.randint(1, min(12, top))
    form = rng.randrange(5)
    if form == 0 or (form == 3 and a == b):
        return f"What is {a} + {b}? {a + b}."
    if form == 1:
        return f"What is {hi} - {lo}? {hi - lo}."
    if form == 2:
        return f"What is {x} times {y}? {x * y}."
    if form == 3:
        return f"Which is larger, {a} or {b}? {hi}."
    words = " ".join(rng.sample(COPY_WORDS, 2))
    return f'Repeat: "{words}"\n{words}'


def _arith_line(rng: random.Random, top: int, qa_share: float = 0.0) -> str:
    """One line of arithmetic. Question wording matches the post-training tasks (What is a + b?)."""
    if qa_share and rng.random() < qa_share:
        return _qa_line(rng, top)
    a, b = rng.randint(0, top), rng.randint(0, top)
    hi, lo = max(a, b), min(a, b)
    x, y = rng.randint(1, min(12, top)), rng.randint(1, min(12, top))
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    form = rng.randrange(14)
    if form == 0:
        return f"{a} + {b} = {a + b}"
    if form == 1:
        return f"{hi} - {lo} = {hi - lo}"
    if form == 2:
        return f"{x} * {y} = {x * y}"
    if form == 3:
        return f"What is {a} + {b}? {a + b}."
    if form == 4:
        return f"What is {hi} - {lo}? {hi - lo}."
    if form == 5:
        return f"What is {x} times {y}? {x * y}."
    if form == 6:
        return f"What is {a} * {y}? {a * y}."
    if form == 7:
        return f"Which is larger, {a} or {b}? {hi}." if a != b else f"{a} and {b} are equal."
    if form == 8:
        return f"{a} plus {b} is {a + b}, and {hi} minus {lo} is {hi - lo}."
    if form == 9:
        return f"{name} has {a} {thing} and gets {b} more, so {name} has {a + b} {thing}."
    if form == 10:
        return f"{name} had {hi} {thing} and gave away {lo}. Now {name} has {hi - lo} {thing}."
    if form == 11:
        return f"{name} has {x} bags with {y} {thing} in each bag, so {x * y} {thing} in all."
    if form == 12:
        return f"{x} * {y} = {x * y}, so {x * y} / {y} = {x}."
    c = rng.randint(0, top)
    return f"{a} + {b} - {c} = {a + b - c}" if rng.random() < 0.5 else f"({a} + {b}) * {x} = {(a + b) * x}"


def _arithmetic(cfg: MixConfig, src: SourceConfig) -> Iterator[str]:
    rng = source_rng(cfg, src, "generate")
    for _ in range(cfg.arithmetic_docs):
        lines = [rng.choice(HEADINGS)]
        length = rng.randint(150, 400)
        while sum(map(len, lines)) < length:
            lines.append(_arith_line(rng, cfg.arithmetic_max_operand, cfg.arithmetic_qa_share))
        yield "\n".join(lines).strip()


# ------------------------------------------------------------------------------------------ files
def resolve_files(src: SourceConfig) -> list[Path]:
    """The files a `files` source names (sorted), or InputError naming the path."""
    path = Path(src.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise InputError(f"source {src.name!r}: {path}/ holds no {'/'.join(SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise InputError(f"source {src.name!r}: {path}: unsupported file type (use {', '.join(SUFFIXES)})")
        return [path]
    if not glob.has_magic(src.path):
        raise InputError(f"source {src.name!r}: {path} does not exist")
    files = sorted(Path(p) for p in glob.glob(src.path, recursive=True) if Path(p).suffix in SUFFIXES)
    if not files:
        raise InputError(f"source {src.name!r}: no {'/'.join(SUFFIXES)} files match {src.path}")
    return files


def _jsonl_rows(path: Path, field: str) -> Iterator[str]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as err:  # UnicodeDecodeError is a ValueError too
                raise InputError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if field not in row:
                raise InputError(f"{path}:{lineno}: missing field {field!r}")
            if not isinstance(row[field], str):
                raise InputError(f"{path}:{lineno}: field {field!r} is {type(row[field]).__name__}, not a string")
            yield row[field]


def _txt(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 ({err})") from None
    if "\x00" in text:  # valid UTF-8 can still be an image or an archive; text files hold no NUL bytes
        raise InputError(f"{path}: a binary file (it holds NUL bytes), not text")
    return text


def _parquet_file(path: Path, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise InputError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column {field!r} is {kind}, not a string column")
    return pf


def _parquet_rows(path: Path, field: str) -> Iterator[str]:
    for batch in _parquet_file(path, field).iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _files(cfg: MixConfig, src: SourceConfig) -> Reader:
    files = resolve_files(src)
    for path in files:  # validate everything now; reading later may stop early
        if path.suffix == ".jsonl":
            for _ in _jsonl_rows(path, src.text_field):
                pass
        elif path.suffix == ".parquet":
            _parquet_file(path, src.text_field)
        else:
            _txt(path)

    def read() -> Iterator[str]:
        order = list(files)
        source_rng(cfg, src, "read").shuffle(order)
        for path in order:
            if path.suffix == ".jsonl":
                yield from _jsonl_rows(path, src.text_field)
            elif path.suffix == ".parquet":
                yield from _parquet_rows(path, src.text_field)
            else:
                yield _txt(path)

    return read


# ------------------------------------------------------------------------------------------ hub
def _hf(cfg: MixConfig, src: SourceConfig) -> Reader:
    if not cfg.allow_network:  # the config refuses this too; kept for callers that build configs by hand
        raise InputError(f"source {src.name!r} downloads {src.dataset}: set mix.allow_network: true")
    try:
        import datasets
    except ImportError as err:
        raise InputError(f"source {src.name!r}: the datasets package is needed ({err})") from None
    try:
        data = datasets.load_dataset(src.dataset, split=src.split, streaming=True)
    except Exception as err:  # hub errors come in many types; all mean the same to the user
        raise InputError(f"source {src.name!r}: cannot load {src.dataset} split {src.split}: {err}") from None
    columns = getattr(data, "column_names", None)
    if columns and src.text_field not in columns:
        raise InputError(f"source {src.name!r}: {src.dataset} has no column {src.text_field!r} "
                         f"(columns: {', '.join(columns)})")

    def read() -> Iterator[str]:
        for i, row in enumerate(data):
            text = row.get(src.text_field)
            if not isinstance(text, str):
                raise InputError(f"{src.dataset}[{src.split}] row {i}: field {src.text_field!r} is not a string")
            yield text

    return read


def open_source(src: SourceConfig, cfg: MixConfig) -> Reader:
    """Validate a source and return a function that yields its raw documents in a seeded order."""
    if src.kind == "files":
        return _files(cfg, src)
    if src.kind == "hf":
        return _hf(cfg, src)
    builtin = {"pydoc": _pydoc, "stdlib": _stdlib, "arithmetic": _arithmetic}[src.kind]
    return lambda: builtin(cfg, src)
