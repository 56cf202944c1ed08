"""Stage `tokenizer`: train a tokenizer on the corpus's training split, measure it on the held-out split. With a
base model (the base stage's), its own tokenizer is kept and measured instead.

Byte-level BPE by default: its 256-byte alphabet means no input is ever unknown. WordPiece and Unigram
are options; both mark spaces with Metaspace's "▁" and decode by plain concatenation, so
decode(encode(text)) gives the text back as long as every character was seen in training (an unseen
character becomes the unk token; WordPiece turns the whole word around it into unk, as BERT does).

    <out>/tokenizer/            loadable with AutoTokenizer.from_pretrained (eos, pad, chat template)
    <out>/bytes_per_token.csv   source,bytes_per_token on the val split (plus "overall")
"""

from __future__ import annotations

import csv
import sys
import time
import unicodedata
from pathlib import Path
from typing import Iterator

from lmforge import chat
from lmforge.errors import ConfigError
from lmforge.config import TokenizerConfig
from lmforge.data.corpus import iter_texts, source_names
from lmforge.errors import InputError
from lmforge.models import NOT_WRITTEN
from lmforge.stage import cli, write_meta

BATCH = 1000  # texts per batch for training and encode_batch
BYTE_ALPHABET = 256
VOCAB_SAMPLE_CHARS = 1_000_000  # encoding all of train costs more than training; a strided sample tells vocab use


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    """The configured specials (eos first, so it gets id 0), plus the unk token where the model needs one."""
    specials = list(cfg.special_tokens)
    if cfg.kind != "bpe" and cfg.unk_token not in specials:
        specials.append(cfg.unk_token)
    return specials


def bpe_pattern(cfg: TokenizerConfig) -> str:
    """The regex that cuts text into the pieces byte-level BPE merges within (never across).

    One pattern serves training (rustbpe or the HF trainer) and encoding (the saved pre-tokenizer), so
    what the merges were learned on is what they are applied to.
    """
    if cfg.pre_tokenizer == "gpt4":
        # a word keeps one leading non-letter ("_name", ".append", "(self"), newlines stay with the punctuation
        # before them. On the default corpus: 2.81 held-out bytes/token against gpt2's 2.71, yet the default
        # 4M-parameter model, at the same step budget, ended worse per byte (base 2.55 vs 2.47 bits/byte on pydoc)
        number = r"\p{N}" if cfg.split_digits else r"\p{N}{1,3}"
        return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + number
                + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    # GPT-2's regex. Split digits stand alone, and the spaces before them make one piece.
    number = r"\p{N}|\s+(?=\p{N})" if cfg.split_digits else r" ?\p{N}+"
    # gpt2_eol: a line's end joins the punctuation before it ("):\n", ",\n"), the rest is GPT-2's; on the
    # default corpus +3.5% bytes/token (2.80 vs 2.70 held out), see docs/findings/tokenizer.md
    punct = r" ?[^\s\p{L}\p{N}]+" + (r"[\r\n]*" if cfg.pre_tokenizer == "gpt2_eol" else "")
    return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|" + number + "|" + punct + r"|\s+(?!\S)|\s+"


def bpe_pre_tokenizer(cfg: TokenizerConfig):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe_pattern(cfg)), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def byte_symbols() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which `tokenizers` uses too):
    printable Latin-1 bytes stand for themselves, the others move to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_ranks(ranks: list[tuple[bytes, int]]) -> list[tuple[bytes, bytes]]:
    """The merge list behind tiktoken-style ranks: a token of rank r is what BPE over its bytes, using only
    ranks below r, joins last; that join is its merge."""
    rank = dict(ranks)
    merges = []
    for token, r in sorted(ranks, key=lambda x: x[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: rank.get(parts[i] + parts[i + 1], r))
            if rank.get(parts[best] + parts[best + 1], r) >= r:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise RuntimeError(f"rustbpe ranks are not a merge sequence at rank {r}: {token!r}")
        merges.append((parts[0], parts[1]))
    return merges


def train_rustbpe(cfg: TokenizerConfig, texts: list[str], specials: list[str]):
    """Byte-level BPE merges learned by rustbpe (Rust, parallel counting), as a `tokenizers` BPE model with
    the same pre-tokenizer: specials take the first ids, then the 256 bytes, then the merges in order."""
    import rustbpe
    from tokenizers import Tokenizer, decoders, models

    learner = rustbpe.Tokenizer()
    learner.train_from_iterator(iter(texts), cfg.vocab_size - len(specials), pattern=bpe_pattern(cfg))
    ranks = learner.get_mergeable_ranks()
    sym = byte_symbols()
    text_of = lambda token: "".join(sym[b] for b in token)  # noqa: E731
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({text_of(token): len(specials) + r for token, r in ranks})
    merges = [(text_of(a), text_of(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = bpe_pre_tokenizer(cfg)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def build(cfg: TokenizerConfig):
    """An untrained tokenizer: model, normalizer, pre-tokenizer and decoder for `cfg.kind`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.decoder = decoders.ByteLevel()
        tok.pre_tokenizer = bpe_pre_tokenizer(cfg)
        return tok
    digits = [pre_tokenizers.Digits(individual_digits=True)] if cfg.split_digits else []
    # prepend_scheme="never": no invented leading space, so text between chat specials round-trips exactly
    metaspace = dict(replacement="▁", prepend_scheme="never")
    # a run of spaces stays with the word after it ("▁▁▁▁return"): indented code is cheap, as with
    # GPT-2's regex; Metaspace's own split would make every space of an indent its own piece
    words = [
        pre_tokenizers.Metaspace(**metaspace, split=False),
        pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), "isolated"),
    ]
    if cfg.kind == "wordpiece":
        # words longer than max_input_chars_per_word become unk whole; 100 (the default) loses long indents
        tok = Tokenizer(
            models.WordPiece(unk_token=cfg.unk_token, continuing_subword_prefix="##", max_input_chars_per_word=1000)
        )
        # punctuation on its own: short words (fewer whole-word unks) and no word can start with "##"
        words.append(pre_tokenizers.Punctuation("isolated"))
        # strip the continuation marker and concatenate; spaces come back from "▁"
        tok.decoder = decoders.Sequence([decoders.Replace(Regex(r"\A##"), ""), decoders.Metaspace(**metaspace)])
    else:
        tok = Tokenizer(models.Unigram())
        tok.decoder = decoders.Metaspace(**metaspace)
    tok.normalizer = normalizers.NFC()  # canonical composition only: never changes what the text says
    tok.pre_tokenizer = pre_tokenizers.Sequence([*words, *digits])
    return tok


def trainer_name(cfg: TokenizerConfig) -> str:
    return cfg.bpe_trainer if cfg.kind == "bpe" else "hf"


def trainer(cfg: TokenizerConfig, specials: list[str]):
    from tokenizers import pre_tokenizers, trainers

    common = dict(vocab_size=cfg.vocab_size, special_tokens=specials, show_progress=sys.stderr.isatty())
    if cfg.kind == "bpe":
        return trainers.BpeTrainer(
            min_frequency=cfg.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    if cfg.kind == "wordpiece":
        return trainers.WordPieceTrainer(min_frequency=cfg.min_frequency, continuing_subword_prefix="##", **common)
    return trainers.UnigramTrainer(unk_token=cfg.unk_token, **common)


# ------------------------------------------------------------------------------------------ reading
def _read_source(corpus: Path, source: str, quota: int | None) -> list[str]:
    texts, n = [], 0
    try:
        for text in iter_texts(corpus, "train", source):
            if quota is not None and n + len(text) > quota:
                if quota - n:
                    texts.append(text[: quota - n])
                break
            texts.append(text)
            n += len(text)
    except (ValueError, KeyError, TypeError) as err:  # malformed JSON line or a row without "text"
        raise InputError(f"{corpus}/train: malformed document in source {source!r}: {err!r}") from None
    return texts


def read_train(corpus: Path, max_chars: int) -> dict[str, list[str]]:
    """Training texts per source, at most `max_chars` in all, each source cut to its share of the cap.

    Shards are read in file order, so the sample is deterministic. A corpus whose files are no larger
    than the cap is read whole in one pass (a character never takes less than a byte of JSON).
    """
    sources = source_names(corpus, "train")
    if not sources:
        raise InputError(f"{corpus}/train: no training shards (run the mix stage)")
    size = sum(p.stat().st_size for p in (Path(corpus) / "train").glob("*.jsonl"))
    if size <= max_chars:
        per_source = {s: _read_source(corpus, s, None) for s in sources}
    else:
        counts = {s: sum(len(t) for t in iter_texts(corpus, "train", s)) for s in sources}
        total = sum(counts.values())
        quotas = {s: max_chars * c // total for s, c in counts.items()} if total > max_chars else counts
        per_source = {s: _read_source(corpus, s, quotas[s]) for s in sources}
    if not any(t for texts in per_source.values() for t in texts):
        raise InputError(f"{corpus}/train: the training split holds no text")
    return per_source


def read_val(corpus: Path) -> dict[str, list[str]]:
    try:
        return {s: [t for t in iter_texts(corpus, "val", s) if t] for s in source_names(corpus, "val")}
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{corpus}/val: malformed document: {err!r}") from None


# ------------------------------------------------------------------------------------------- checks
def min_vocab(cfg: TokenizerConfig, texts: list[str]) -> tuple[int, str]:
    """The smallest vocab_size the trainer can honour, and why; the initial alphabet has to fit."""
    n_special = len(special_tokens(cfg))
    if cfg.kind == "bpe":
        return BYTE_ALPHABET + n_special, f"{BYTE_ALPHABET} byte symbols + {n_special} special tokens"
    chars = set(unicodedata.normalize("NFC", "".join(texts)))
    if " " in chars:  # Metaspace turns spaces into "▁"
        chars = (chars - {" "}) | {"▁"}
    need = len(chars) + n_special
    why = f"{len(chars)} distinct characters in the training text + {n_special} special tokens"
    if cfg.kind == "unigram":
        # tokenizers' UnigramTrainer keeps every piece when the characters alone fill vocab_size - specials
        need, why = need + 1, why + " + 1 (UnigramTrainer needs room for one piece beyond the characters)"
    return need, why


def check_vocab(cfg: TokenizerConfig, texts: list[str]) -> None:
    need, why = min_vocab(cfg, texts)
    if cfg.vocab_size < need:
        raise ConfigError(
            f"tokenizer.vocab_size: {cfg.vocab_size} is too small for {cfg.kind}: it needs at least {need} ({why})"
        )


# ------------------------------------------------------------------------------------------ metrics
def _batches(texts: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(texts), BATCH):
        yield texts[i : i + BATCH]


def encode_stats(tok, texts: list[str], seen: set[int], unk_id: int | None) -> tuple[int, int, int]:
    """UTF-8 bytes, tokens and unk tokens of `texts`; adds the ids used to `seen`."""
    n_bytes = n_tokens = n_unk = 0
    for batch in _batches(texts):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            n_tokens += len(enc.ids)
            seen.update(enc.ids)
            if unk_id is not None:
                n_unk += enc.ids.count(unk_id)
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
    return n_bytes, n_tokens, n_unk


def measure(tok, unk_id: int | None, train: dict[str, list[str]], val: dict[str, list[str]]) -> dict:
    vocab = tok.get_vocab_size()
    bpt, seen, tot_b, tot_t, tot_u = {}, set(), 0, 0, 0
    for source, texts in val.items():
        b, t, u = encode_stats(tok, texts, seen, unk_id)
        if t:
            bpt[source] = round(b / t, 4)
        tot_b, tot_t, tot_u = tot_b + b, tot_t + t, tot_u + u
    texts = [t for ts in train.values() for t in ts]
    stride = max(1, -(-sum(map(len, texts)) // VOCAB_SAMPLE_CHARS))  # every stride-th doc: all sources, spread
    train_seen: set[int] = set()
    train_b, train_t, _ = encode_stats(tok, texts[::stride], train_seen, unk_id)
    return {
        "bytes_per_token": {"overall": round(tot_b / tot_t, 4) if tot_t else None, **bpt},
        "train_sample_bytes_per_token": round(train_b / train_t, 4) if train_t else None,
        "vocab_used_val": round(len(seen) / vocab, 4),
        "vocab_used_train_sample": round(len(train_seen) / vocab, 4),
        "unk_rate_val": round(tot_u / tot_t, 6) if tot_t else 0.0,
        "val_tokens": tot_t,
    }


# -------------------------------------------------------------------------------------------- stage
def write_bytes_per_token(out: Path, metrics: dict, tracker) -> None:
    with (out / "bytes_per_token.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "bytes_per_token"])
        writer.writerows(metrics["bytes_per_token"].items())
    tracker.log_artifact(out / "bytes_per_token.csv")


def keep_base(cfg: TokenizerConfig, corpus: Path, base: Path, out: Path, tracker) -> dict:
    """The base model's own tokenizer, kept (a new one would make its embeddings meaningless), measured on the mix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    print(f"tokenizer: keeping the base model's tokenizer ({len(tok)} tokens); tokenizer.kind and the training "
          "knobs are unused", file=sys.stderr)
    metrics = {"vocab_size": len(tok), "trainer": "kept from the base model",
               **measure(tok.backend_tokenizer, tok.unk_token_id, read_train(corpus, cfg.max_train_chars),
                         read_val(corpus))}
    write_bytes_per_token(out, metrics, tracker)
    tok.save_pretrained(out / "tokenizer")
    write_meta(out / "tokenizer", "tokenizer", cfg, metrics, {"corpus": corpus, "base": base})
    return metrics


def run(cfg: TokenizerConfig, *, corpus: Path, out: Path, tracker, base: Path | None = None) -> dict:
    """Train a tokenizer on the corpus's train split (or keep the base model's); write it to out/tokenizer with
    its val metrics."""
    from transformers import PreTrainedTokenizerFast

    corpus, out = Path(corpus), Path(out)
    if base is not None and not (Path(base) / NOT_WRITTEN).is_file():
        return keep_base(cfg, corpus, Path(base), out, tracker)
    train = read_train(corpus, cfg.max_train_chars)
    val = read_val(corpus)
    texts = [t for ts in train.values() for t in ts]
    check_vocab(cfg, texts)

    start = time.perf_counter()
    if cfg.kind == "bpe" and cfg.bpe_trainer == "rustbpe":
        tok = train_rustbpe(cfg, texts, special_tokens(cfg))
    else:
        tok = build(cfg)
        tok.train_from_iterator(_batches(texts), trainer=trainer(cfg, special_tokens(cfg)), length=len(texts))
    train_time = time.perf_counter() - start
    if tok.get_vocab_size() > cfg.vocab_size:  # WordPiece adds "##" forms of the characters to its alphabet
        raise ConfigError(
            f"tokenizer.vocab_size: {cfg.vocab_size} is too small for {cfg.kind}: its initial alphabet alone "
            f"(characters, their continuation forms and the special tokens) makes {tok.get_vocab_size()} entries"
        )

    metrics = {
        "vocab_size": tok.get_vocab_size(),
        "trainer": trainer_name(cfg),
        "train_time_s": round(train_time, 2),
        "train_chars": sum(map(len, texts)),
        "train_chars_per_source": {s: sum(map(len, ts)) for s, ts in train.items()},
        **measure(tok, tok.token_to_id(cfg.unk_token) if cfg.kind != "bpe" else None, train, val),
    }

    write_bytes_per_token(out, metrics, tracker)
    # model_max_length stays transformers' "unbounded" default: pretrain decides the context length
    fast = chat.configure(PreTrainedTokenizerFast(tokenizer_object=tok))
    fast.save_pretrained(out / "tokenizer")
    write_meta(out / "tokenizer", "tokenizer", cfg, metrics, {"corpus": corpus})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli("tokenizer", run, inputs=("corpus",), argv=argv,
               options={"base": {"type": Path, "default": None, "help": "the base stage's model folder: keep its tokenizer"}})


if __name__ == "__main__":
    sys.exit(main())
