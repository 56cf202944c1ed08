"""The mix stage: sources, normalisation, filters, dedup, budget and weights, splits, bad input."""

from __future__ import annotations

import csv
import json
import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from lmforge.data import corpus
from tasks import mix
from lmforge.errors import ConfigError
from lmforge.config import MixConfig, parse_section
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute
from lmforge.tracking import NullTracker

TINY = {"budget_chars": 60_000, "arithmetic_docs": 600, "max_doc_chars": 1000}


def cfg(**overrides) -> MixConfig:
    return parse_section("mix", {**TINY, **overrides})


def run_mix(config: MixConfig, out: Path) -> dict:
    return execute("mix", mix.run, config, out, {}, tracker=NullTracker())


def shards(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted((out / "corpus").rglob("*.jsonl"))}


def prose(rng: random.Random, words: int = 60) -> str:
    vocab = "alpha beta gamma delta river stone cloud light paper green quiet north orange window".split()
    return " ".join(rng.choice(vocab) + str(rng.randrange(1000)) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mix") / "out"
    return out, run_mix(cfg(), out)


# ------------------------------------------------------------------------------------------ text
def test_normalize():
    text = "Cafe\u0301 \t\r\nline two  \rthree\x00\n\n\n\n\n\nfour\n\n"
    assert mix.normalize(text) == "Caf\u00e9\nline two\nthree\n\n\nfour"


def test_chunk_cuts_on_paragraphs_then_lines():
    paras = [f"paragraph {i} " + "x" * 300 for i in range(10)]
    pieces = mix.chunk("\n\n".join(paras), 1000)
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) == 4
    assert all(p.startswith("paragraph") for p in pieces), "pieces start at a paragraph"
    long_para = "\n".join("line %d %s" % (i, "y" * 50) for i in range(100)) + "\n" + "z" * 2500
    pieces = mix.chunk(long_para, 1000)
    assert all(len(p) <= 1000 for p in pieces)
    assert "".join(pieces).replace("\n", "") == long_para.replace("\n", ""), "nothing lost"
    assert mix.chunk("short", 1000) == ["short"] and mix.chunk("", 1000) == []


def test_quality_filters():
    c = cfg(min_doc_chars=20)
    assert mix.quality_issue("too short", c) == "too_short"
    assert mix.quality_issue("#$%^&*()!@#$%^&*()!@ ok", c) == "symbols"
    assert mix.quality_issue("same line\n" * 5 + "other line", c) == "dup_lines"
    assert mix.quality_issue("A sentence of ordinary words.\nAnother one here.", c) is None


def test_val_score_stable():
    assert mix.val_score("doc", 0) == mix.val_score("doc", 0)
    assert mix.val_score("doc", 0) != mix.val_score("doc", 1)
    scores = [mix.val_score(f"doc {i}", 0) for i in range(2000)]
    assert 0.04 < sum(s < 0.05 for s in scores) / len(scores) < 0.06


# ------------------------------------------------------------------------------------------ built-in
def test_builtin_mix_writes_corpus(builtin_run):
    out, metrics = builtin_run
    c = cfg()
    assert (out / "metrics.json").exists() and not (out.parent / f".{out.name}.staging").exists()
    assert corpus.source_names(out / "corpus", "train") == ["arithmetic", "pydoc", "stdlib"]
    assert corpus.source_names(out / "corpus", "val") == ["arithmetic", "pydoc", "stdlib"]
    train = list(corpus.iter_docs(out / "corpus", "train"))
    val = list(corpus.iter_docs(out / "corpus", "val"))
    assert len(train) == metrics["docs_train"] and len(val) == metrics["docs_val"] > 0
    assert sum(len(d["text"]) for d in train) == metrics["chars_train"] <= c.budget_chars
    assert not {d["text"] for d in train} & {d["text"] for d in val}, "held-out text is never trained on"
    assert all(c.min_doc_chars <= len(d["text"]) <= c.max_doc_chars for d in train)
    # proportions follow the weights (each source has enough text at this budget)
    for src in c.sources:
        s = metrics["sources"][src.name]
        assert s["proportion"] == pytest.approx(src.weight, abs=0.05), src.name
        assert s["chars_train"] <= s["target_chars"] and not s["exhausted"]
        assert s["docs_in"] >= s["docs_train"] + s["docs_val"]
    # Python source, whichever modules this interpreter's seed draws (pieces may be docstrings and comments)
    stdlib = "\n".join(d["text"] for d in train + val if d["source"] == "stdlib")
    assert any(word in stdlib for word in ("def ", "import ", "class ", "return ")), stdlib[:500]
    arithmetic = "\n".join(corpus.iter_texts(out / "corpus", "train", "arithmetic"))
    assert " + " in arithmetic and " - " in arithmetic and " * " in arithmetic and "What is " in arithmetic
    rows = list(csv.DictReader((out / "mixture.csv").open()))
    assert [r["source"] for r in rows] == ["pydoc", "stdlib", "arithmetic"]
    assert sum(float(r["proportion"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
    meta = json.loads((out / "corpus" / META_FILE).read_text())
    assert meta["stage"] == "mix" and meta["metrics"]["chars_train"] == metrics["chars_train"]


def test_same_seed_same_shards_other_seed_differs(builtin_run, tmp_path):
    out, _ = builtin_run
    run_mix(cfg(), tmp_path / "again")
    assert shards(tmp_path / "again") == shards(out)
    run_mix(cfg(seed=1), tmp_path / "other")
    assert shards(tmp_path / "other") != shards(out)


def test_arithmetic_answers_are_right(builtin_run):
    out, _ = builtin_run
    checked = 0
    for text in corpus.iter_texts(out / "corpus", "train", "arithmetic"):
        for line in text.splitlines():
            if line.count("=") == 1 and "," not in line:
                lhs, rhs = line.split("=")
                assert eval(lhs) == int(rhs), line  # noqa: S307 (generated digits and operators only)
                checked += 1
    assert checked > 50


def test_weights_and_short_source(tmp_path):
    """A source with too little text gives all it has; the others keep their targets."""
    rng = random.Random(0)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(30)))
    sources = [{"kind": "arithmetic", "weight": 3}, {"name": "small", "kind": "files", "path": str(small)}]
    metrics = run_mix(cfg(sources=sources, budget_chars=80_000), tmp_path / "out")
    a, s = metrics["sources"]["arithmetic"], metrics["sources"]["small"]
    assert a["target_chars"] == 60_000 and 0.95 * 60_000 < a["chars_train"] <= 60_000
    assert s["exhausted"] and s["shortfall_chars"] > 0 and s["docs_train"] + s["docs_val"] == 30
    assert metrics["chars_train"] <= 80_000


# ------------------------------------------------------------------------------------------ files
def test_files_source_txt_jsonl_parquet_with_dedup_and_filters(tmp_path):
    rng = random.Random(1)
    docs = [prose(rng) for _ in range(40)]
    data = tmp_path / "data"
    (data / "txt").mkdir(parents=True)
    for i, text in enumerate(docs[:10]):
        (data / "txt" / f"{i}.txt").write_text(text + "  \r\n")
    (data / "txt" / "dup.txt").write_text(docs[0])  # same as 0.txt once normalised
    near = docs[1].split()
    near[-1] = "changed."  # one shingle of 56 differs: Jaccard ~0.96
    rows = [{"text": t, "id": i} for i, t in enumerate(docs[10:25])]
    rows += [{"text": " ".join(near)}, {"text": "tiny"}]
    (data / "part.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"body": docs[25:]}), data / "part.parquet")

    sources = [
        {"name": "txt", "kind": "files", "path": str(data / "txt" / "*.txt")},
        {"name": "jsonl", "kind": "files", "path": str(data / "part.jsonl")},
        {"name": "pq", "kind": "files", "path": str(data / "part.parquet"), "text_field": "body"},
    ]
    out = tmp_path / "out"
    metrics = run_mix(cfg(sources=sources, budget_chars=100_000), out)
    s = metrics["sources"]
    assert (s["txt"]["docs_in"], s["jsonl"]["docs_in"], s["pq"]["docs_in"]) == (11, 17, 15)
    assert s["txt"]["exact_dups"] == 1 and s["jsonl"]["near_dups"] == 1
    assert s["jsonl"]["filtered"]["too_short"] == 1
    kept = [d["text"] for split in ("train", "val") for d in corpus.iter_docs(out / "corpus", split)]
    assert len(kept) == len(set(kept)) and set(kept) <= set(docs), "only distinct, unfiltered documents"
    train = {d["text"] for d in corpus.iter_docs(out / "corpus", "train")}
    assert sum(x["docs_train"] for x in s.values()) == len(train) >= 35, "all fit the budget: nearly all train"
    assert metrics["exact_dups"] == 1 and metrics["near_dups"] == 1 and metrics["filtered"] == 1

    # a directory source finds all three kinds of file (the parquet has no 'text' column: an error)
    with pytest.raises(InputError, match="part.parquet: no column 'text'"):
        run_mix(cfg(sources=[{"kind": "files", "path": str(data)}]), tmp_path / "dir")


# ------------------------------------------------------------------------------------------ bad input
def _assert_fails(tmp_path: Path, sources: list[dict], match: str, **overrides) -> None:
    out = tmp_path / "failed"
    with pytest.raises(InputError, match=match):
        run_mix(cfg(sources=sources, **overrides), out)
    assert not out.exists() and not list(tmp_path.glob(".failed.staging*")), "nothing partial is published"


def test_missing_file_and_empty_glob(tmp_path):
    missing = tmp_path / "nope.jsonl"
    _assert_fails(tmp_path, [{"kind": "pydoc"}, {"kind": "files", "path": str(missing)}], f"{missing} does not exist")
    _assert_fails(tmp_path, [{"kind": "files", "path": str(tmp_path / "*.txt")}], r"no .* files match .*\*\.txt")
    (tmp_path / "notes.csv").write_text("a,b\n")
    _assert_fails(tmp_path, [{"kind": "files", "path": str(tmp_path / "notes.csv")}], "unsupported file type")


def test_malformed_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text"}\n{"text": "broken\n')
    _assert_fails(tmp_path, [{"kind": "pydoc"}, {"kind": "files", "path": str(bad)}], rf"{bad}:2: not valid JSON")
    bad.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
    _assert_fails(tmp_path, [{"kind": "files", "path": str(bad)}], rf"{bad}:3: missing field 'text'")
    bad.write_text('{"text": 5}\n')
    _assert_fails(tmp_path, [{"kind": "files", "path": str(bad)}], rf"{bad}:1: field 'text' is int")
    bad.write_text("[1, 2]\n")
    _assert_fails(tmp_path, [{"kind": "files", "path": str(bad)}], rf"{bad}:1: expected a JSON object")


def test_bad_txt_and_parquet(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 " * 50)
    _assert_fails(tmp_path, [{"kind": "files", "path": str(tmp_path / "latin.txt")}], "latin.txt: not valid UTF-8")
    (tmp_path / "fake.parquet").write_text("not parquet")
    _assert_fails(tmp_path, [{"kind": "files", "path": str(tmp_path / "fake.parquet")}], "fake.parquet: not a readable")


def test_empty_after_filtering_lists_counts(tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    _assert_fails(tmp_path, [{"name": "short", "kind": "files", "path": str(short)}],
                  r"empty after filtering: short: 5 in, 0 out \(filtered \{'too_short': 5")


def test_config_errors():
    with pytest.raises(ConfigError, match="duplicate source name"):
        parse_section("mix", {"sources": [{"kind": "pydoc"}, {"kind": "pydoc", "weight": 2}]})
    with pytest.raises(ConfigError, match=r"sources.0.weight: Input should be greater than 0"):
        parse_section("mix", {"sources": [{"kind": "pydoc", "weight": 0}]})
    with pytest.raises(ConfigError, match="weight: Input should be greater than 0"):
        parse_section("mix", {"sources": [{"kind": "pydoc", "weight": -1.5}]})
    with pytest.raises(ConfigError, match="set mix.allow_network: true"):
        parse_section("mix", {"sources": [{"kind": "hf", "dataset": "some/set"}]})
    with pytest.raises(ConfigError, match="set its path"):
        parse_section("mix", {"sources": [{"kind": "files"}]})
    with pytest.raises(ConfigError, match="multiple of minhash_bands"):
        parse_section("mix", {"minhash_perms": 64, "minhash_bands": 5})
    with pytest.raises(ValidationError):
        MixConfig(sources=[])


def test_hf_source_streams_only_with_network(tmp_path, monkeypatch):
    """No download: datasets.load_dataset is replaced by a fake that records its call."""
    rng = random.Random(2)
    rows = [{"content": prose(rng)} for _ in range(25)]
    calls = []

    class Fake(list):
        column_names = ["content"]

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return Fake(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = {"name": "web", "kind": "hf", "dataset": "some/set", "text_field": "content"}
    metrics = run_mix(cfg(sources=[src], allow_network=True), tmp_path / "out")
    assert calls == [("some/set", "train", True)]
    assert metrics["sources"]["web"]["docs_in"] == 25
    _assert_fails(tmp_path, [{**src, "dataset": "missing/set"}], "cannot load missing/set", allow_network=True)
    _assert_fails(tmp_path, [{**src, "text_field": "text"}], r"no column 'text' \(columns: content\)",
                  allow_network=True)


def test_cli_exit_codes(tmp_path, capsys):
    rng = random.Random(3)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(20)))
    params = tmp_path / "params.yaml"
    params.write_text(f"mix:\n  budget_chars: 20000\n  sources:\n    - {{kind: files, path: '{data}'}}\n")
    assert mix.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "corpus" / "train" / "files-00000.jsonl").exists()
    data.write_text('{"text": "x"}\nnot json\n')
    assert mix.main(["--params", str(params), "--out", str(tmp_path / "out2")]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_task_lines_are_right():
    """The post-training task lines in the arithmetic text carry the right answers, in the tasks' wording."""
    import re

    from lmforge.data import sources

    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        line = sources._qa_line(rng, 99)
        if m := re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\? (\d+)\.", line):
            a, op, b, c = m.groups()
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op], line
            seen.add(op)
        elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\? (\d+)\.", line):
            assert int(m[3]) == max(int(m[1]), int(m[2])) and m[1] != m[2], line
            seen.add("larger")
        else:
            question, answer = line.split("\n")
            assert question == f'Repeat: "{answer}"' and len(answer.split()) == 2, line
            seen.add("repeat")
    assert seen == {"+", "-", "times", "larger", "repeat"}
