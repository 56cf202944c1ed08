"""Post-training data: templated tasks with known answers, a ground-truth scorer and JSONL loading.

Tasks (short answers a tiny model can learn; wording matches the arithmetic text in the pretraining mix):

    add      "What is 13 + 9?"             -> "22"     operands 0..20
    sub      "What is 17 - 9?"             -> "8"      operands 0..20, never negative
    mul      "What is 7 times 8?"          -> "56"     operands 1..12
    larger   "Which is larger, 17 or 12?"  -> "17"     distinct operands 0..20
    repeat   'Repeat: "red moon"'          -> "red moon"   two distinct words from WORDS (a copy task; quoted, so
                                                           the first word is the same token in question and answer)

Splits: a question belongs to "train" or "test" by a stable hash of its text (TEST_PERCENT of the
question space is test), so the two splits never share a question whatever the seed or n.

Preference rule (the ground truth a reward model should learn): the correct answer beats a wrong
one. `chosen` is the correct answer; `rejected` is a near miss, either off by 1..10 or the answer
to a different operation on the same operands (for `larger`: the smaller number; for `repeat`: the
words swapped or one of them replaced).

`load_jsonl` reads user data in TRL's standard dataset formats and reports each bad row as
`InputError("path:line: what is wrong")`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable

from lmforge.errors import InputError

SPLITS = ("train", "test")
TEST_PERCENT = 20
MAX_ADD = 20  # 0..99 (before): SFT at this compute learned neither two-digit sums nor comparisons
MAX_MUL = 12
ROLES = ("system", "user", "assistant")
KINDS = ("messages", "prompt_completion", "preference", "prompt")
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "star", "rain",
         "snow", "milk", "bread", "apple", "river", "stone", "cloud", "light", "house", "road", "ship", "hat",
         "cup", "door", "key", "box", "pen", "lamp", "ring", "leaf", "rose", "bear", "frog", "boat", "bell")


# ------------------------------------------------------------------------------------------ tasks
def _add(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)
    return f"What is {a} + {b}?", str(a + b), [str(abs(a - b)), str(a * b)]


def _sub(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(0, MAX_ADD), rng.randint(0, MAX_ADD)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b), [str(a + b)]


def _mul(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(1, MAX_MUL), rng.randint(1, MAX_MUL)
    return f"What is {a} times {b}?", str(a * b), [str(a + b)]


def _larger(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.sample(range(MAX_ADD + 1), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b)), [str(min(a, b))]


def _repeat(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b, c = rng.sample(WORDS, 3)
    return f'Repeat: "{a} {b}"', f"{a} {b}", [f"{b} {a}", f"{a} {c}", f"{c} {b}"]


# name -> generator of (question, answer, answers to other operations on the same operands)
TASKS: dict[str, Callable[[random.Random], tuple[str, str, list[str]]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "larger": _larger, "repeat": _repeat,
}


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by its text alone."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _examples(split: str, n: int, seed: int) -> list[tuple[str, str, str, list[str]]]:
    """n (task, question, answer, alternatives) of a split, tasks in turn so each gets an equal share.

    Questions are unique within a call while the task's question space allows (mul has only 144),
    then that task accepts repeats: the first time 1000 draws find nothing new, it is marked used up, so
    later draws do not search again (8000 conversations took 8 s of searching before this).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"lmforge-posttrain:{split}:{seed}")
    names = list(TASKS)
    seen: set[str] = set()
    used_up: set[str] = set()
    out = []
    for i in range(n):
        name = names[i % len(names)]
        for attempt in range(2000):
            q, a, alts = TASKS[name](rng)
            if split_of(q) == split and (q not in seen or name in used_up or attempt >= 1000):
                break
        if q in seen:
            used_up.add(name)
        seen.add(q)
        out.append((name, q, a, alts))
    return out


def conversations(split: str, n: int, seed: int) -> list[dict]:
    """SFT rows: {"messages": [user, assistant], "answer", "task"} (TRL conversational format)."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": a, "task": t}
        for t, q, a, _ in _examples(split, n, seed)
    ]


def prompts(split: str, n: int, seed: int) -> list[dict]:
    """RL / evaluation rows: {"prompt": [user], "answer", "task"} (TRL conversational prompt-only format)."""
    return [{"prompt": [{"role": "user", "content": q}], "answer": a, "task": t} for t, q, a, _ in _examples(split, n, seed)]


def _wrong(answer: str, alternatives: list[str], rng: random.Random) -> str:
    """A near miss: half the time another operation's answer, else the right one off by 1..10 (never negative)."""
    others = [x for x in alternatives if x != answer]
    if others and (rng.random() < 0.5 or not answer.isdigit()):
        return rng.choice(others)
    value = int(answer)
    delta = rng.randint(1, 10)
    return str(value + delta if value - delta < 0 or rng.random() < 0.5 else value - delta)


def preference_pairs(split: str, n: int, seed: int) -> list[dict]:
    """Reward/DPO rows: {"prompt": [user], "chosen": [assistant good], "rejected": [assistant bad], "answer", "task"}."""
    rng = random.Random(f"lmforge-preference:{split}:{seed}")
    rows = []
    for t, q, a, alts in _examples(split, n, seed):
        bad = _wrong(a, alts, rng)
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": bad}],
            "answer": a,
            "task": t,
        })
    return rows


TURN_END = re.compile(r"<\|(?:end|endoftext|im_end|eot_id)\|>")  # lmforge's, ChatML's, Llama 3's


def extract(completion: str) -> str:
    """The answer part of a completion: text up to the first end-of-turn or eos, stripped."""
    return TURN_END.split(completion, 1)[0].strip()


def score(completion: str, answer: str) -> float:
    """Ground-truth reward: 1.0 when the completion's answer equals `answer` exactly, else 0.0."""
    return 1.0 if extract(completion) == answer.strip() else 0.0


# ------------------------------------------------------------------------------------ user data
def _check_messages(value, field: str, need_assistant: bool) -> str | None:
    """What is wrong with a conversational message list, or None."""
    if not isinstance(value, list) or not value:
        return f'"{field}" must be a non-empty list of messages'
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f'"{field}"[{i}] must be an object with "role" and "content"'
        if m.get("role") not in ROLES:
            return f'"{field}"[{i}].role must be one of {", ".join(ROLES)}, got {m.get("role")!r}'
        if not isinstance(m.get("content"), str):
            return f'"{field}"[{i}].content must be a string'
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return f'"{field}" has no assistant message to learn from'
    return None


def _check_text_or_messages(row: dict, field: str, need_assistant: bool = False) -> str | None:
    if field not in row:
        return f'missing "{field}"'
    value = row[field]
    if isinstance(value, str):
        return None if value.strip() else f'"{field}" is empty'
    return _check_messages(value, field, need_assistant)


def _problem(row: dict, kind: str) -> str | None:
    if kind == "messages":
        if "messages" not in row:
            return 'missing "messages"'
        return _check_messages(row["messages"], "messages", need_assistant=True)
    fields = {"prompt_completion": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
              "prompt": ("prompt",)}[kind]
    for f in fields:
        if (err := _check_text_or_messages(row, f)) is not None:
            return err
    if len({isinstance(row[f], str) for f in fields}) > 1:
        return f"{', '.join(fields)} must all be strings (standard) or all message lists (conversational)"
    if "answer" in row and not isinstance(row["answer"], str):
        return '"answer" must be a string'
    return None


def detect_kind(row: dict) -> str:
    """The TRL format a row is in, from its keys."""
    if "messages" in row:
        return "messages"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "completion" in row:
        return "prompt_completion"
    if "prompt" in row:
        return "prompt"
    raise ValueError('no "messages", "prompt"/"completion" or "chosen"/"rejected" key')


def load_jsonl(path: str | Path, kind: str = "auto", linenos: list[int] | None = None) -> list[dict]:
    """Rows of a JSONL file in one TRL format (kind "auto": detected from the first row), all validated.
    `linenos`, when given, receives each row's line number (for later messages about a row)."""
    path = Path(path)
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be auto or one of {KINDS}, got {kind!r}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a data file (name the .jsonl file)")
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    rows = []
    with path.open("rb") as fh:  # bytes: a line that is not UTF-8 is reported with its number
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: a row must be a JSON object, got {type(row).__name__}")
            if kind == "auto":
                try:
                    kind = detect_kind(row)
                except ValueError as err:
                    raise InputError(f"{path}:{lineno}: unknown format: {err}") from None
            if (err := _problem(row, kind)) is not None:
                raise InputError(f"{path}:{lineno}: {err} (format {kind})")
            rows.append(row)
            if linenos is not None:
                linenos.append(lineno)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def to_messages(row: dict) -> list[dict]:
    """A messages or prompt_completion row as one conversation (a bare string is a user / assistant turn)."""
    if "messages" in row:
        return row["messages"]
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return [*prompt, *completion]
