"""The repository talks about the product, not about how the work on it was organised.

Scans every text file git knows of (`git ls-files --cached --others --exclude-standard`: tracked files plus new
ones not ignored; deleted, binary and non-UTF-8 files skipped; this file excluded): code, docs, configs, tests,
bench results. It fails on any of these phrases, case-insensitive:

- `issue 12`, `issue #12`: references to a work ticket (an upstream bug is cited by its URL instead)
- `this|that|last|previous|earlier|next|a later|an earlier|each|every` + `stop|session|round` (`this round`,
  `an earlier stop`, `each session`); not `stop token`/`stop sequence`/`stop word`/`stop string`
- `another|other` + `engineer|session|agent` (`another engineer's test runs`, `shared with other sessions`)
- `engineer's`, `of this work`, `to this work`, `was|were lent`: who did or was given what
- `the brief's`, `in|per|of the brief`: the task description, not the product
- run labels such as `F's day`, `A's run`

Technical uses stay legal because the patterns are phrases: pytest's `scope="session"`, a process started in its
own session (setsid), stop tokens, "stops the server", `round()`. ALLOWED lists the few exact lines that match a
pattern and are about the product.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()

PATTERNS = [
    r"\bissue ?#?\d+",
    r"\b(?:this|that|last|previous|earlier|next|a later|an earlier|each|every) (?:stop|session|round)s?\b"
    r"(?! ?(?:token|sequence|word|string|id|criteri))",
    r"\b(?:another|other) (?:engineer|session|agent)s?\b",
    r"\bengineer's\b",
    r"\b(?:of|to) this work\b",
    r"\b(?:was|were) lent\b",
    r"\b(?:the brief's|(?:in|per|of) the brief)\b",
    r"\b[A-Z]'s (?:day|run)\b",
]
WORDS = re.compile("|".join(f"(?:{p})" for p in PATTERNS), re.I)
# the last pattern is about capital run labels: case matters there
LABEL = re.compile(PATTERNS[-1])
ALLOWED: set[tuple[str, str]] = set()  # (path, exact matched phrase) that are about the product


def scanned_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to list")
    paths = []
    for name in sorted(set(out.decode().split("\0")) - {""}):
        path = ROOT / name
        if path.resolve() != SELF and path.is_file():
            paths.append(path)
    return paths


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def hits(text: str, rel: str = "") -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in WORDS.finditer(line):
            phrase = m.group(0)
            if re.fullmatch(PATTERNS[-1], phrase, re.I) and not LABEL.fullmatch(phrase):
                continue  # "a's run" in lower case is ordinary English
            if (rel, phrase) not in ALLOWED:
                found.append(f"{rel}:{lineno}: {phrase!r} in {line.strip()[:120]!r}")
    return found


def test_no_words_about_how_the_work_was_organised():
    found = []
    for path in scanned_files():
        text = text_of(path)
        if text is not None:
            found += hits(text, str(path.relative_to(ROOT)))
    assert not found, "words about the work, not the product:\n" + "\n".join(found)


@pytest.mark.parametrize("sentence", [
    "Where issue 12's targets stand", "measured in an earlier stop", "the largest gain of this round",
    "shared with another engineer's test runs", "no GPU machine was lent to this work", "CI run, F's day",
    "an earlier run of this work", "while other sessions shared the machine", "see issue #7",
])
def test_planted_sentences_are_caught(sentence):
    assert hits(sentence)


@pytest.mark.parametrize("sentence", [
    '@pytest.fixture(scope="session")', "starts the server in its own session (setsid)", "each stop token ends a reply",
    "stops the server", "value = round(x, 3)", "a session cookie", "the stop sequence", "the next step",
])
def test_technical_words_pass(sentence):
    assert not hits(sentence)
