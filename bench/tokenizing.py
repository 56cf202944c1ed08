"""Row 4: the tokenizer stage vs sentencepiece BPE at the same vocabulary size on the same corpus.

Training time: the stage's own `train_time_s` (the `train_from_iterator` call) vs the
`SentencePieceTrainer.train` call, both fed the same in-memory documents. Compression: UTF-8 bytes per
token on the held-out split, encoded without special tokens.

sentencepiece is set up to keep text as it is (identity normalisation, spaces kept, digits split like
our default). Two baselines, because "same vocabulary size" can be read two ways:
- byte fallback on: lossless on any input like our byte-level BPE, but 256 of its entries are bytes;
- byte fallback off: every entry but the characters is a merge (more merges at the same size), unseen
  characters become <unk>. This is the harder baseline for compression at small vocabularies.
"""

from __future__ import annotations

import io
import os
import time

from bench.core import Context, Row, Skip, log, ratio_row, stage_module


def held_out_bpt(encode, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in encode(texts))
    return n_bytes / n_tokens


def sp_threads() -> int:
    """sentencepiece gets the threads our trainer gets: one when TOKENIZERS_PARALLELISM is off."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in {"false", "0", "off", "no"}:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_sentencepiece(texts: list[str], vocab_size: int, byte_fallback: bool, threads: int):
    """(seconds, processor)."""
    import sentencepiece as spm

    model = io.BytesIO()
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=byte_fallback, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 20, num_threads=threads, minloglevel=2,
        hard_vocab_limit=False,  # a corpus too small for the size gets fewer pieces, not an error (tests)
    )
    seconds = time.perf_counter() - start
    return seconds, spm.SentencePieceProcessor(model_proto=model.getvalue())


def tokenizer_rows(ctx: Context, vocab_size: int | None = None) -> list[Row]:
    try:
        import sentencepiece  # noqa: F401
    except ImportError as err:
        raise Skip("sentencepiece is not installed: pip install -e '.[bench]'") from err
    stage = stage_module("tokenizer")
    from tokenizers import Tokenizer

    from lmforge.data.corpus import iter_texts
    from lmforge.tracking import NullTracker

    corpus, _ = ctx.data()
    cfg = ctx.stage_config(ctx.sizes.data_preset, "tokenizer")
    if vocab_size:
        cfg = cfg.model_copy(update={"vocab_size": vocab_size})
    if cfg.kind != "bpe":
        raise Skip(f"the {ctx.sizes.data_preset} preset's tokenizer is {cfg.kind}, this row compares BPE")

    # the stage reads the whole training split when it is under max_train_chars; so does the baseline
    texts, chars = [], 0
    for text in iter_texts(corpus, "train"):
        texts.append(text)
        chars += len(text)
    if chars > cfg.max_train_chars:
        raise Skip(f"training split ({chars:,} chars) is over tokenizer.max_train_chars: inputs would differ")
    val = [t for t in iter_texts(corpus, "val") if t]
    threads = sp_threads()

    ours_times, sp_times, sp_char_times = [], [], []
    for i in range(ctx.sizes.repeats):
        log(f"tokenizer: stage run {i + 1}/{ctx.sizes.repeats} (vocab {cfg.vocab_size})")
        out = ctx.workdir / f"tokenizer-{i}"
        out.mkdir(parents=True, exist_ok=True)
        metrics = stage.run(cfg, corpus=corpus, out=out, tracker=NullTracker())
        ours_times.append(float(metrics["train_time_s"]))
        log(f"tokenizer: sentencepiece {i + 1}/{ctx.sizes.repeats}")
        seconds, sp = train_sentencepiece(texts, cfg.vocab_size, True, threads)
        sp_times.append(seconds)
        seconds, sp_char = train_sentencepiece(texts, cfg.vocab_size, False, threads)
        sp_char_times.append(seconds)

    # compression of the last trained models (training is deterministic, every repeat gives the same)
    ours = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    ours_bpt = held_out_bpt(lambda b: [e.ids for e in ours.encode_batch(b, add_special_tokens=False)], val)
    sp_bpt = held_out_bpt(sp.encode, val)
    sp_char_bpt = held_out_bpt(sp_char.encode, val)
    ids = sp_char.encode(val)
    sp_char_unk = sum(x.count(sp_char.unk_id()) for x in ids) / max(1, sum(map(len, ids)))
    sizes = {"ours": ours.get_vocab_size(), "sentencepiece": sp.get_piece_size(),
             "sentencepiece_no_fallback": sp_char.get_piece_size()}
    short = {k: v for k, v in sizes.items() if v < cfg.vocab_size}  # a corpus too small for the size
    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    common = (f"vocab {cfg.vocab_size}{f' (reached: {short})' if short else ''}, {chars:,} training chars "
              f"({ctx.sizes.data_preset} mix), {len(val)} held-out docs; sentencepiece {threads} thread(s), "
              f"TOKENIZERS_PARALLELISM={parallel}")
    time_row = ratio_row("4a", "tokenizer_train_time", "Tokenizer training time (tokenizer stage)", min(ours_times),
                         min(sp_times), "s", baseline_name="sentencepiece BPE (byte fallback)", at_most=1.0,
                         note=f"{common}; best of {ctx.sizes.repeats}; sentencepiece without byte fallback: "
                              f"{min(sp_char_times):.2f} s", ours_runs=ours_times, baseline_runs=sp_times)
    bpt_row = ratio_row("4b", "tokenizer_bytes_per_token", "Held-out bytes/token (tokenizer stage)", ours_bpt, sp_bpt,
                        "bytes/token", baseline_name="sentencepiece BPE, byte fallback (lossless, like ours)",
                        at_least=0.98, note="higher is better; " + common, vocab_sizes=sizes)
    char_row = ratio_row("4c", "tokenizer_bytes_per_token_charvocab", "Held-out bytes/token vs character-vocab BPE",
                         ours_bpt, sp_char_bpt, "bytes/token",
                         baseline_name="sentencepiece BPE, no byte fallback (more merges, unseen chars → unk)",
                         at_least=0.98, note=f"higher is better; its unk rate on held-out: {sp_char_unk:.2%}")
    return [time_row, bpt_row, char_row]

