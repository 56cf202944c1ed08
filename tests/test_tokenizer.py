"""The tokenizer stage on a small hand-made corpus: each kind trains, loads with AutoTokenizer, round-trips
text, keeps digits and specials apart, carries the chat template, reports metrics; bad input fails early."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from lmforge import chat
from lmforge.errors import ConfigError
from lmforge.config import TokenizerConfig, parse_section
from lmforge.errors import InputError
from lmforge.stage import META_FILE, execute, read_json
from tasks.tokenizer import main, run
from lmforge.tracking import NullTracker

KINDS = ("bpe", "wordpiece", "unigram")
VOCAB = 400
CHATS = [chat.EOS, chat.PAD, chat.SYSTEM, chat.USER, chat.ASSISTANT, chat.END]
# every character here occurs in the corpus, so WordPiece/Unigram have no unknowns and must round-trip exactly
ROUNDTRIP = "def add(a, b):\n    return a + b  # sum\n\nThe fox jumps over 12 dogs. What is 37 + 45? 82."


def _docs(source: str, n: int, rng: random.Random) -> list[str]:
    words = "the quick brown fox jumps over lazy dog and then returns home to sum numbers".split()
    docs = []
    for i in range(n):
        if source == "prose":
            docs.append(" ".join(rng.choice(words) for _ in range(60)).capitalize() + ". The End.")
        elif source == "code":
            docs.append(
                f"def add_{i}(a, b):\n    return a + b  # sum\n\n\nclass Box{i}:\n"
                f"    def __init__(self, x):\n        self.x = [x, {i}]\n"
            )
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            docs.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The sum of {a} and {b} is {a + b}. " * 2)
    return docs


def write_corpus(root: Path, n: int = 150) -> Path:
    """A corpus in lmforge/data/corpus.py's layout: train shards and a val file per source."""
    rng = random.Random(0)
    for source in ("prose", "code", "arith"):
        docs = [{"text": t, "source": source} for t in _docs(source, n, rng)]
        split = {"val": docs[: n // 10], "train": docs[n // 10 :]}
        for name, rows in split.items():
            path = root / name / (f"{source}.jsonl" if name == "val" else f"{source}-00000.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def train(corpus: Path, out: Path, **cfg) -> dict:
    return execute("tokenizer", run, TokenizerConfig(**cfg), out, {"corpus": corpus}, tracker=NullTracker())


@pytest.fixture(scope="module", params=KINDS)
def trained(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "tokenizer_stage"
    metrics = train(corpus, out, kind=request.param, vocab_size=VOCAB)
    from transformers import AutoTokenizer

    return request.param, out, metrics, AutoTokenizer.from_pretrained(out / "tokenizer")


def test_round_trip_through_auto_tokenizer(trained):
    kind, out, metrics, tok = trained
    ids = tok.encode(ROUNDTRIP, add_special_tokens=False)
    assert tok.decode(ids) == ROUNDTRIP, kind
    assert len(ids) < len(ROUNDTRIP.encode())  # it learned merges, not just characters
    if kind == "bpe":  # bytes: characters never seen in training still come back
        unseen = "naïve café → 🙂 Ωmega\t\r\n"
        assert tok.decode(tok.encode(unseen, add_special_tokens=False)) == unseen
    assert tok.eos_token == chat.EOS and tok.pad_token == chat.PAD
    assert tok.eos_token_id == 0 and metrics["vocab_size"] == len(tok) <= VOCAB
    meta = read_json(out / "tokenizer" / META_FILE)
    assert meta["stage"] == "tokenizer" and meta["config"]["kind"] == kind


def test_digits_split_and_specials_single(trained):
    kind, _, _, tok = trained
    assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345"), kind
    for special in CHATS:
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    ids = tok.encode(f"{chat.USER}hi 7{chat.END}", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(chat.USER) and ids[-1] == tok.convert_tokens_to_ids(chat.END)


@pytest.mark.parametrize("pre, split_digits, pieces", [
    ("gpt2", True, ["x", ".", "append", "(", "self", ")", "\n    ", "1", "2", "3", "4", " it", "'s"]),
    ("gpt2", False, ["x", ".", "append", "(", "self", ")", "\n   ", " 1234", " it", "'s"]),
    ("gpt2_eol", True, ["x", ".", "append", "(", "self", ")\n", "    ", "1", "2", "3", "4", " it", "'s"]),
    ("gpt2_eol", False, ["x", ".", "append", "(", "self", ")\n", "   ", " 1234", " it", "'s"]),
    ("gpt4", True, ["x", ".append", "(self", ")\n", "   ", " ", "1", "2", "3", "4", " it", "'s"]),
    ("gpt4", False, ["x", ".append", "(self", ")\n", "   ", " ", "123", "4", " it", "'s"]),
])
def test_bpe_pieces(pre, split_digits, pieces):
    """Where byte-level BPE may merge, for each pre-tokenizer, with and without digit splitting."""
    from tokenizers import decoders

    from tasks.tokenizer import build

    tok = build(TokenizerConfig(kind="bpe", split_digits=split_digits, pre_tokenizer=pre))
    got = [decoders.ByteLevel().decode([p]) for p, _ in tok.pre_tokenizer.pre_tokenize_str("x.append(self)\n    1234 it's")]
    assert got == pieces


@pytest.mark.parametrize("pre", ["gpt2", "gpt2_eol", "gpt4"])
def test_rustbpe_tokenizer_encodes_as_rustbpe_does(corpus, tmp_path, pre):
    """The tokenizer.json built from rustbpe's ranks (merges recovered, HF's regex engine) cuts and merges
    held-out text exactly as rustbpe itself does: same ids, shifted past the specials."""
    import rustbpe
    from tokenizers import Tokenizer

    from lmforge.data.corpus import iter_texts
    from tasks.tokenizer import bpe_pattern, read_train

    cfg = TokenizerConfig(vocab_size=VOCAB, pre_tokenizer=pre)
    train(corpus, tmp_path / "out", vocab_size=VOCAB, pre_tokenizer=pre)
    ours = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer" / "tokenizer.json"))
    learner = rustbpe.Tokenizer()
    texts = [t for ts in read_train(corpus, cfg.max_train_chars).values() for t in ts]
    learner.train_from_iterator(iter(texts), VOCAB - len(CHATS), pattern=bpe_pattern(cfg))
    val = [t for t in iter_texts(corpus, "val")] + [ROUNDTRIP, "x  1\n\n  22 naïve 🙂\t\r\n"]
    for text in val:
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == [i + len(CHATS) for i in learner.encode(text)], text
        assert ours.decode(got) == text


def test_rustbpe_and_hf_trainer_agree(corpus, tmp_path):
    """Either trainer gives nearly the same vocabulary (ties may break another way) and compression."""
    rust = train(corpus, tmp_path / "rust", vocab_size=VOCAB, bpe_trainer="rustbpe")
    hf = train(corpus, tmp_path / "hf", vocab_size=VOCAB, bpe_trainer="hf")
    vocab = {name: set(json.loads((tmp_path / name / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
             for name in ("rust", "hf")}
    assert len(vocab["rust"] & vocab["hf"]) >= 0.95 * len(vocab["hf"])
    assert rust["bytes_per_token"]["overall"] == pytest.approx(hf["bytes_per_token"]["overall"], rel=0.02)
    assert (rust["trainer"], hf["trainer"]) == ("rustbpe", "hf")


def test_merges_from_ranks_rebuilds_the_merge_order():
    from tasks.tokenizer import merges_from_ranks

    ranks = [(bytes([b]), b) for b in range(256)]
    for token in (b"ab", b"abc", b"xy", b"abcxy"):  # "abc" = "ab"+"c"; "abcxy" = "abc"+"xy"
        ranks.append((token, len(ranks)))
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"x", b"y"), (b"abc", b"xy")]
    with pytest.raises(RuntimeError, match="not a merge sequence"):
        merges_from_ranks([*ranks[:256], (b"abc", 256)])  # nothing below it builds "abc" from two tokens


def test_chat_template_masks_assistant(trained):
    kind, _, _, tok = trained
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "The sum is 7."}]
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask) and any(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == f"The sum is 7.{chat.END}", kind
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(messages, tokenize=False)


def test_metrics_and_csv(trained):
    kind, out, metrics, _ = trained
    bpt = metrics["bytes_per_token"]
    assert set(bpt) == {"overall", "prose", "code", "arith"}
    assert all(v > 1 for v in bpt.values()), (kind, bpt)
    assert 0 < metrics["vocab_used_val"] <= metrics["vocab_used_train_sample"] <= 1
    assert metrics["unk_rate_val"] == 0 and metrics["train_chars"] > 0 and metrics["train_time_s"] >= 0
    assert read_json(out / "metrics.json")["vocab_size"] == metrics["vocab_size"]
    with (out / "bytes_per_token.csv").open() as fh:
        rows = {r["source"]: float(r["bytes_per_token"]) for r in csv.DictReader(fh)}
    assert rows == pytest.approx(bpt)


def test_deterministic(corpus, tmp_path):
    a = train(corpus, tmp_path / "a", vocab_size=VOCAB)
    b = train(corpus, tmp_path / "b", vocab_size=VOCAB)
    model_a = json.loads((tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text())["model"]
    model_b = json.loads((tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text())["model"]
    assert model_a == model_b and a["bytes_per_token"] == b["bytes_per_token"]


@pytest.mark.parametrize(
    "kind, vocab, needs",
    [("bpe", 100, "262"), ("wordpiece", 20, "distinct characters"), ("unigram", 20, "distinct characters"),
     ("wordpiece", 90, "continuation forms")],  # enough for the characters, not for their "##" forms
)
def test_small_vocab_names_key_and_publishes_nothing(corpus, tmp_path, kind, vocab, needs):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size") as err:
        train(corpus, out, kind=kind, vocab_size=vocab)
    assert needs in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".*staging"))


def test_train_cap_keeps_every_source(corpus, tmp_path):
    metrics = train(corpus, tmp_path / "out", vocab_size=VOCAB, max_train_chars=6000)
    per_source = metrics["train_chars_per_source"]
    assert metrics["train_chars"] <= 6000 and all(n > 0 for n in per_source.values()), per_source


def test_bad_input(tmp_path):
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "val").mkdir()
    with pytest.raises(InputError, match="no training shards"):
        train(tmp_path / "c", tmp_path / "out")
    (tmp_path / "c" / "train" / "x-00000.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="malformed"):
        train(tmp_path / "c", tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        train(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_special_tokens_must_hold_chat_tokens():
    with pytest.raises(ConfigError, match=r"tokenizer\.special_tokens.*first special token"):
        parse_section("tokenizer", {"special_tokens": [chat.PAD, chat.EOS]})
    with pytest.raises(ConfigError, match=r"<\|assistant\|>"):
        parse_section("tokenizer", {"special_tokens": [chat.EOS, chat.PAD, chat.USER, chat.END, chat.SYSTEM]})
    assert parse_section("tokenizer", {"special_tokens": [*CHATS, "<|tool|>"]}).special_tokens[-1] == "<|tool|>"


def test_cli(corpus, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("tokenizer:\n  vocab_size: 300\n")
    assert main(["--params", str(params), "--corpus", str(corpus), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()
    params.write_text("tokenizer:\n  vocab_size: 200\n")
    assert main(["--params", str(params), "--corpus", str(corpus), "--out", str(tmp_path / "bad")]) == 2
    assert "tokenizer.vocab_size" in capsys.readouterr().err
