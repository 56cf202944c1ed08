"""lmforge's benchmarks: lm-eval YAML templates beside this file, and the held-out data they run on.

lm-eval reads local data through `dataset_path: json` with absolute `data_files`, so the data and
the task files are written at run time: `write_tasks` writes one JSONL per task into `data_dir` and
one task file per task into `yaml_dir` (`include:` of the template here + task name + data path),
the folder to hand to `TaskManager(include_path=...)`.

    arith_mc     multiple choice over numeric options, loglikelihood (acc, acc_norm)
    arith_gen    chat-formatted question, greedy answer until <|end|>, exact match
    cloze        last word of a held-out prose sentence among cloze_choices words (loglikelihood; acc, acc_norm)
    ppl_<src>    rolling loglikelihood of held-out documents per corpus source (bits_per_byte, word_perplexity)

Questions come from `lmforge.data.posttrain_data`'s test split, prose and documents from the corpus val split.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lmforge.data import posttrain_data
from lmforge.chat import EOS, end_token
from lmforge.data.corpus import iter_texts, source_names
from lmforge.errors import InputError

TEMPLATES = Path(__file__).resolve().parent
PREFIX = "lmforge_"  # keeps our task names clear of lm-eval's built-in ones
# a sentence-final word: letters only, after whitespace, before a full stop and whitespace
_LAST_WORD = re.compile(r"(?<=[ \n])([A-Za-z]{3,})(?=\.(?:\s|$))")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def _unique(rows: list[dict], key) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        if key(row) not in seen:
            seen.add(key(row))
            out.append(row)
    return out


# -------------------------------------------------------------------------------------- the data
def arith_mc_rows(n: int, choices: int, seed: int) -> list[dict]:
    """Test-split questions with the answer and choices-1 near misses (another operation's result, or off by 1..10)."""
    rng = random.Random(f"lmforge-arith-mc:{seed}")
    rows = []
    def numeric(pair) -> bool:  # near-miss options need numbers; word-answer tasks (repeat) are left out
        return all(x.lstrip("-").isdigit() for x in (pair["answer"], pair["rejected"][0]["content"]))

    pairs = _unique(posttrain_data.preference_pairs("test", 3 * n, seed), lambda r: r["prompt"][0]["content"])
    for pair in [p for p in pairs if numeric(p)][:n]:
        answer = int(pair["answer"])
        wrong = [int(pair["rejected"][0]["content"])]
        offsets = [answer + d for d in range(-10, 11) if d and answer + d >= 0]
        rng.shuffle(offsets)
        for value in offsets:
            if len(wrong) >= choices - 1:
                break
            if value not in wrong:
                wrong.append(value)
        options = [answer, *wrong[: choices - 1]]
        rng.shuffle(options)
        rows.append({"question": pair["prompt"][0]["content"], "choices": [str(o) for o in options],
                     "label": options.index(answer), "task": pair["task"]})
    return rows


def arith_gen_rows(n: int, seed: int, tokenizer) -> list[dict]:
    """Test-split prompts rendered with the models' chat template, ending in the assistant tag."""
    rows = _unique(posttrain_data.prompts("test", n, seed), lambda r: r["prompt"][0]["content"])
    return [
        {"prompt": tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
         "question": r["prompt"][0]["content"], "answer": r["answer"], "task": r["task"]}
        for r in rows
    ]


def _prose(text: str, start: int) -> bool:
    """The word at `start` sits on an unindented line of mostly letters (not code, not a table)."""
    line_start = text.rfind("\n", 0, start) + 1
    line = text[line_start:start]
    if line.startswith((" ", "\t")) or len(line) < 20:
        return False
    return sum(c.isalpha() or c == " " for c in line) / len(line) > 0.9


_WORD = re.compile(r"(?<=[ \n])[A-Za-z]{3,}\b")


def cloze_rows(corpus: Path, source: str, n: int, context_chars: int, seed: int, choices: int = 4) -> list[dict]:
    """n sentence-final words of the source's val documents with the text before them as context.

    Multiple choice: the word and choices-1 distractors drawn from the sentence-final words of the source's
    val text, in proportion to how often each occurs there (the distribution the answers come from, so a
    word-frequency prior alone sits near chance, 1/choices; the context has to pick the word); other words
    only when those run short. Exact-match LAMBADA (greedy whole word) scored 0.00 for every model this small.
    """
    candidates, pool, words = [], [], []
    for doc_index, text in enumerate(iter_texts(corpus, "val", source)):
        pool.extend(m.group(1) for m in _LAST_WORD.finditer(text))
        words.extend(m.group(0) for m in _WORD.finditer(text))
        for m in _LAST_WORD.finditer(text):
            start = m.start()
            if start < 40 or not _prose(text, start):
                continue
            ctx_start = max(0, start - 1 - context_chars)
            context = text[ctx_start : start - 1]
            if ctx_start > 0 and (cut := re.search(r"\s", context)):  # start at a word boundary
                context = context[cut.end() :]
            candidates.append((doc_index, start, {"context": context, "target": text[start - 1] + m.group(1)}))
    if not candidates:
        raise InputError(f"{corpus}/val/{source}.jsonl: no prose sentences found for the cloze task")
    rng = random.Random(f"lmforge-cloze:{seed}")
    picked = sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda c: c[:2])
    rows = []
    for _, _, row in picked:
        word = row["target"][1:]
        if len({w.lower() for w in pool} - {word.lower()}) < choices - 1:
            pool = pool + words
        if len({w.lower() for w in pool} - {word.lower()}) < choices - 1:
            raise InputError(f"{corpus}/val/{source}.jsonl: too few distinct words for {choices} cloze choices")
        wrong: list[str] = []
        while len(wrong) < choices - 1:  # frequency-weighted draw, no repeats
            w = rng.choice(pool)
            if w.lower() not in {x.lower() for x in (word, *wrong)}:
                wrong.append(w)
        options = [word, *wrong]
        rng.shuffle(options)
        # each option carries the target's leading whitespace (target_delimiter is "")
        rows.append({**row, "choices": [row["target"][0] + o for o in options], "label": options.index(word)})
    return rows


def ppl_rows(corpus: Path, source: str, docs: int, max_chars: int) -> list[dict]:
    """The first `docs` non-empty val documents of a source, cut to max_chars."""
    rows = []
    for text in iter_texts(corpus, "val", source):
        if text.strip():
            rows.append({"text": text[:max_chars]})
        if len(rows) >= docs:
            break
    return rows


# --------------------------------------------------------------------------------- the task files
def _task_file(yaml_dir: Path, template: str, name: str, data: Path, **extra) -> None:
    import yaml

    spec = {"include": str(TEMPLATES / f"{template}.yaml"), "task": PREFIX + name,
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, **extra}
    (yaml_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def write_tasks(cfg, corpus: Path, tokenizer, data_dir: Path, yaml_dir: Path) -> dict[str, int]:
    """Write data and task files for `cfg.tasks` (an EvaluateConfig); returns {task name: examples}."""
    data_dir.mkdir(parents=True, exist_ok=True)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}

    def add(template: str, name: str, rows: list[dict], **extra) -> None:
        if not rows:
            raise InputError(f"benchmark {name}: no examples could be built")
        _task_file(yaml_dir, template, name, _write_jsonl(data_dir / f"{name}.jsonl", rows), **extra)
        sizes[name] = len(rows)

    if "arith_mc" in cfg.tasks:
        add("arith_mc", "arith_mc", arith_mc_rows(cfg.mc_questions, cfg.mc_choices, cfg.seed))
    if "arith_gen" in cfg.tasks:
        end = end_token(tokenizer)
        stops = [i for i in tokenizer.convert_tokens_to_ids([end, EOS]) if i is not None and i >= 0
                 and i != tokenizer.unk_token_id]
        generation = {"until": [end], "max_gen_toks": cfg.max_gen_tokens, "do_sample": False,
                      # stop each sequence of a batch at its own <|end|>: lm-eval decodes with special tokens
                      # skipped, so text a finished row went on to generate could not be cut off afterwards
                      "eos_token_id": stops}
        add("arith_gen", "arith_gen", arith_gen_rows(cfg.gen_questions, cfg.seed, tokenizer), generation_kwargs=generation)
    if "cloze" in cfg.tasks:
        add("cloze", "cloze", cloze_rows(corpus, cfg.cloze_source, cfg.cloze_items, cfg.cloze_context_chars, cfg.seed,
                                         cfg.cloze_choices))
    if "heldout_ppl" in cfg.tasks:
        for source in source_names(corpus, "val"):
            rows = ppl_rows(corpus, source, cfg.ppl_docs, cfg.ppl_max_chars)
            if rows:
                add("heldout_ppl", f"ppl_{_safe(source)}", rows)
    return sizes
