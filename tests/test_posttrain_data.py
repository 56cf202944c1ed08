import json

import pytest

from lmforge.data import posttrain_data as data
from lmforge.errors import InputError


def _questions(rows):
    return {r["messages"][0]["content"] for r in rows}


def test_splits_are_disjoint_deterministic_and_balanced():
    train, test = data.conversations("train", 2000, 0), data.conversations("test", 400, 0)
    assert len(train) == 2000 and len(test) == 400
    assert not _questions(train) & _questions(test)
    assert not _questions(data.conversations("train", 500, 7)) & _questions(data.conversations("test", 500, 3))
    assert data.conversations("train", 50, 1) == data.conversations("train", 50, 1)
    assert data.conversations("train", 50, 1) != data.conversations("train", 50, 2)
    assert {r["task"] for r in test} == set(data.TASKS)
    assert all(data.split_of(q) == "test" for q in _questions(test))
    with pytest.raises(ValueError):
        data.conversations("val", 1, 0)


def test_answers_are_correct():
    for r in data.conversations("train", 400, 0):
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert a == r["answer"] and r["messages"][1]["role"] == "assistant"
        if r["task"] == "repeat":
            assert q == f'Repeat: "{a}"' and len(set(a.split())) == 2
            continue
        nums = [int(x) for x in q.replace("?", "").replace(",", "").split() if x.isdigit()]
        expected = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
                    "larger": max}[r["task"]](*nums)
        assert a == str(expected) and int(a) >= 0


def test_preference_pairs_and_prompts_share_the_format():
    pairs = data.preference_pairs("train", 200, 0)
    for p in pairs:
        assert p["chosen"][0]["content"] == p["answer"] != p["rejected"][0]["content"]
        assert data.score(p["chosen"][0]["content"], p["answer"]) == 1.0
        assert data.score(p["rejected"][0]["content"], p["answer"]) == 0.0
        assert p["prompt"][0]["role"] == "user"
        assert p["task"] == "repeat" or int(p["rejected"][0]["content"]) >= 0
    assert pairs == data.preference_pairs("train", 200, 0)
    prompts = data.prompts("test", 20, 0)
    assert [p["prompt"][0]["content"] for p in prompts] == [c["messages"][0]["content"] for c in data.conversations("test", 20, 0)]


def test_score():
    assert data.score("68", "68") == 1.0
    assert data.score(" 68 <|end|>What is", "68") == 1.0
    assert data.score("68<|endoftext|>", "68") == 1.0
    assert data.score("69<|end|>", "68") == 0.0
    assert data.score("680", "68") == 0.0
    assert data.score("", "68") == 0.0


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "kind, bad, message",
    [
        ("messages", "{not json", "invalid JSON"),
        ("messages", [1, 2], "must be a JSON object"),
        ("messages", {"text": "x"}, 'missing "messages"'),
        ("messages", {"messages": []}, "non-empty list"),
        ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
        ("messages", {"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ("messages", {"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ("prompt_completion", {"prompt": "q"}, 'missing "completion"'),
        ("prompt_completion", {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "all be strings"),
        ("preference", {"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
        ("preference", {"prompt": "q", "chosen": "", "rejected": "b"}, '"chosen" is empty'),
        ("prompt", {"prompt": "q", "answer": 3}, '"answer" must be a string'),
        ("auto", {"foo": 1}, "unknown format"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path, kind, bad, message):
    first = GOOD if kind in ("messages", "auto") else {
        "prompt_completion": {"prompt": "q", "completion": "a"},
        "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "prompt": {"prompt": [{"role": "user", "content": "q"}], "answer": "1"},
    }[kind]
    path = _write(tmp_path, [first, "", bad] if kind != "auto" else [bad])
    with pytest.raises(InputError) as err:
        data.load_jsonl(path, kind)
    line = 3 if kind != "auto" else 1
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)


def test_load_jsonl_reads_good_files(tmp_path):
    assert data.load_jsonl(_write(tmp_path, [GOOD, GOOD]), "auto") == [GOOD, GOOD]
    pc = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    assert data.load_jsonl(_write(tmp_path, [pc]), "prompt_completion") == [pc]
    assert data.to_messages({"prompt": "q", "completion": "a"}) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pref = data.preference_pairs("train", 3, 0)
    assert data.load_jsonl(_write(tmp_path, pref), "preference") == pref
    assert data.load_jsonl(_write(tmp_path, data.prompts("train", 3, 0)), "auto") == data.prompts("train", 3, 0)
    with pytest.raises(InputError, match="no such data file"):
        data.load_jsonl(tmp_path / "missing.jsonl", "messages")
    with pytest.raises(InputError, match="no rows"):
        data.load_jsonl(_write(tmp_path, [""], "empty.jsonl"), "messages")
