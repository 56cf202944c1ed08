"""Bad input, table-driven: every kind goes through the real stage command (`main(argv)`) on the tiny preset,
in a fresh folder that already holds a previous good output. Each must end with exit code 2 and one
`error:` line naming the file and line or the params key, no traceback, and the previous output untouched.
Every case fails before any training starts (the whole table runs in seconds)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from lmforge import chat

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = '{"previous": "good output"}\n'


@dataclass
class Ctx:
    """What a case may set up: its own folder, and the shared tiny corpus, tokenizer and model."""

    tmp: Path
    corpus: Path
    tokenizer: Path
    model: Path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.model, self.tmp / name))


@dataclass
class Case:
    id: str
    stage: str  # tasks.<stage>
    expect: str  # a piece of the one-line message: the key, or file:line
    params: dict = field(default_factory=dict)  # {section: {key: value}} over the tiny preset
    params_text: str | None = None  # the whole params.yaml instead
    setup: Callable[[Ctx], dict] | None = None  # -> input paths (and params) for this case
    env: dict = field(default_factory=dict)


def files_source(path) -> dict:
    return {"mix": {"sources": [{"name": "notes", "kind": "files", "path": str(path)}]}}


def sft_data(name: str, content: str | bytes, **more) -> Callable[[Ctx], dict]:
    def setup(ctx: Ctx) -> dict:
        return {"params": {"sft": {"data_files": [str(ctx.write(name, content))], **more}}}

    return setup


def messages(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, ensure_ascii=False)


GOOD_ROW = messages(("user", "What is 2 + 2?"), ("assistant", "4"))


def _no_chat_specials(ctx: Ctx) -> dict:
    """A tokenizer with eos and pad but not lmforge's chat tokens (a hand-made or foreign tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[chat.EOS, chat.PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox. 12 + 7 = 19."] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chat.EOS, pad_token=chat.PAD)
    fast.chat_template = chat.CHAT_TEMPLATE
    fast.save_pretrained(ctx.tmp / "tokenizer")
    return {"tokenizer": ctx.tmp / "tokenizer"}


def _corrupt_weights(ctx: Ctx) -> dict:
    model = ctx.model_copy()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])  # a download cut short
    return {"base": model}


def _truncated_tokenizer(ctx: Ctx) -> dict:
    model = ctx.model_copy()
    text = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(text[: len(text) // 3])
    return {"base": model}


def _read_only_out(ctx: Ctx) -> dict:
    os.chmod(ctx.tmp / "out", stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return {"params": files_source(ctx.write("notes.txt", "A note long enough to keep. " * 20)), "unprivileged": True}


CASES = [
    Case("unknown key", "pretrain", "pretrain.dropout: unknown key", {"pretrain": {"dropout": 0.1}}),
    Case("wrong type", "pretrain", "pretrain.max_steps: Input should be a valid integer", {"pretrain": {"max_steps": "ten"}}),
    Case("negative learning rate", "pretrain", "pretrain.lr: Input should be greater than 0", {"pretrain": {"lr": -0.001}}),
    Case("zero steps", "sft", "sft.max_steps: Input should be greater than 0", {"sft": {"max_steps": 0}}),
    Case("vocab too small", "tokenizer", "tokenizer.vocab_size: 100 is too small", {"tokenizer": {"vocab_size": 100}}),
    Case("num_heads not dividing hidden_size", "pretrain", "hidden_size (64) must be a multiple of num_heads (3)",
         {"pretrain": {"num_heads": 3, "num_kv_heads": 1}}),
    Case("num_kv_heads not dividing num_heads", "pretrain", "num_heads (4) must be a multiple of num_kv_heads (3)",
         {"pretrain": {"num_heads": 4, "num_kv_heads": 3}}),
    Case("seq_len beyond the model's context", "pretrain", "pretrain.seq_len (512) is longer than",
         setup=lambda ctx: {"params": {"pretrain": {"seq_len": 512}}, "base": ctx.model}),
    Case("base model not installed", "base", "base.source: no installed package 'no_such_lmforge_pkg'",
         {"base": {"source": "package:no_such_lmforge_pkg"}}),
    Case("unknown preset", "preset", "unknown preset 'nope'"),
    Case("params.yaml not YAML", "pretrain", "params.yaml:3: not valid YAML", params_text="pretrain:\n  lr: [0.1, 2\n  seed: 1\n"),
    Case("empty params.yaml", "pretrain", "params.yaml: empty", params_text="\n"),
    Case("missing corpus", "pretrain", "missing corpus", setup=lambda ctx: {"corpus": ctx.tmp / "out/mix/corpus"}),
    Case("empty corpus after filters", "mix", "the corpus is empty after filtering",
         setup=lambda ctx: {"params": {**files_source(ctx.write("notes.txt", "Too short.")),}}),
    Case("binary file as a text source", "mix", "notes.txt: a binary file",
         setup=lambda ctx: {"params": files_source(ctx.write("notes.txt", bytes(range(32)) * 40))}),
    Case("non-UTF-8 text source", "mix", "notes.txt: not valid UTF-8",
         setup=lambda ctx: {"params": files_source(ctx.write("notes.txt", "café crème ".encode("latin-1") * 40))}),
    Case("non-UTF-8 data file", "sft", "latin.jsonl:2: not valid UTF-8",
         setup=sft_data("latin.jsonl", (GOOD_ROW + "\n" + messages(("user", "café?"), ("assistant", "oui"))).encode("latin-1"))),
    Case("a directory where a file is expected", "sft", "is a directory, not a data file",
         setup=lambda ctx: {"params": {"sft": {"data_files": [str(ctx.write("data/x.jsonl", GOOD_ROW).parent)]}}}),
    Case("missing data file", "sft", "nope.jsonl: no such data file",
         setup=lambda ctx: {"params": {"sft": {"data_files": [str(ctx.tmp / "nope.jsonl")]}}}),
    Case("malformed JSONL line", "sft", "bad.jsonl:2: invalid JSON", setup=sft_data("bad.jsonl", GOOD_ROW + '\n{"messages": [\n')),
    Case("malformed JSONL line in a text source", "mix", "notes.jsonl:3: not valid JSON",
         setup=lambda ctx: {"params": files_source(ctx.write("notes.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n'))}),
    Case("JSONL row in the wrong TRL format", "sft", "pairs.jsonl:1: sft needs messages or prompt_completion rows",
         setup=sft_data("pairs.jsonl", json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")),
    Case("chat with no assistant turn", "sft", "chats.jsonl:2: \"messages\" has no assistant message",
         setup=sft_data("chats.jsonl", GOOD_ROW + "\n" + messages(("user", "Hello?")) + "\n")),
    Case("prompt longer than the context", "sft", "long.jsonl:2: the prompt is",
         setup=sft_data("long.jsonl", "\n".join(json.dumps({"prompt": p, "completion": "ok"}) for p in ("2+2?", "word " * 400)))),
    Case("ppo.policy naming a missing model", "ppo", "missing policy",
         setup=lambda ctx: {"policy": ctx.tmp / "out/lora/model", "params": {"ppo": {"policy": "lora"}}}),
    Case("corrupted safetensors", "sft", "model.safetensors: not a readable safetensors file", setup=_corrupt_weights),
    Case("truncated tokenizer.json", "sft", "tokenizer.json: cannot load the tokenizer", setup=_truncated_tokenizer),
    Case("a tokenizer without the chat specials", "pretrain", "the tokenizer lacks lmforge's chat token(s)",
         setup=_no_chat_specials),
    Case("read-only output folder", "mix", "cannot write", setup=_read_only_out),
    Case("unreachable MLFLOW_TRACKING_URI", "mix", "MLFLOW_TRACKING_URI http://127.0.0.1:9 is unreachable",
         setup=lambda ctx: {"params": files_source(ctx.write("notes.txt", "A note long enough to keep. " * 20))},
         env={"LMFORGE_TRACKING": "on", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    Case("evaluate variants unknown", "evaluate", "evaluate.variants.1: Input should be",
         {"evaluate": {"variants": ["base", "gpt5"]}}),
    Case("evaluate a variant quantize did not write", "evaluate", "quantize.methods left out nf4",
         setup=lambda ctx: {"nf4": ctx.write("out/quantize/nf4/NOT_WRITTEN", "quantize.methods left out nf4\n").parent,
                            "params": {"evaluate": {"variants": ["base", "nf4"]}}}),
]

INPUTS = {  # each stage's inputs by default: the shared tiny ones
    "mix": lambda ctx: {},
    "base": lambda ctx: {},
    "tokenizer": lambda ctx: {"corpus": ctx.corpus},
    "pretrain": lambda ctx: {"corpus": ctx.corpus, "tokenizer": ctx.tokenizer},
    "sft": lambda ctx: {"base": ctx.model},
    "ppo": lambda ctx: {"policy": ctx.model, "reward_model": ctx.model},
    "evaluate": lambda ctx: {"corpus": ctx.corpus, "base": ctx.model},
    "preset": lambda ctx: {},
}


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    from lmforge.cli.preset import resolve

    return {name: cfg.model_dump() for name, cfg in resolve("tiny", ROOT / "configs").items()}


@contextmanager
def unprivileged(active: bool):
    """Root writes through read-only permissions: drop to nobody's uid for the case that needs them to hold."""
    if not active or os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def run_case(case: Case, ctx: Ctx, tiny_params: dict, capsys, monkeypatch) -> tuple[int, str]:
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    found = (case.setup(ctx) if case.setup else {}) or {}
    privileged = not found.pop("unprivileged", False)
    inputs = {**INPUTS[case.stage](ctx), **{k: v for k, v in found.items() if k != "params"}}
    params = ctx.tmp / "params.yaml"
    if case.params_text is not None:
        params.write_text(case.params_text)
    else:
        data = {name: dict(section) for name, section in tiny_params.items()}
        for overlay in (case.params, found.get("params", {})):
            for name, keys in overlay.items():
                data[name].update(keys)
        params.write_text(json.dumps(data))  # JSON is YAML
    if case.stage == "preset":
        argv = ["nope", "--params", str(params), "--configs", str(ROOT / "configs")]
    else:
        argv = ["--params", str(params), "--out", str(ctx.tmp / "out" / case.stage)]
        for name, path in inputs.items():
            argv += [f"--{name.replace('_', '-')}", str(path)]
    capsys.readouterr()
    with unprivileged(not privileged):
        module = "lmforge.cli.preset" if case.stage == "preset" else f"tasks.{case.stage}"
        rc = importlib.import_module(module).main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture()
def case_dir():
    # world-readable, so the read-only case can run as an unprivileged user
    path = Path(tempfile.mkdtemp(prefix="lmforge-bad-input-"))
    path.chmod(0o755)
    yield path
    for folder, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(Path(folder, d), 0o755)
    shutil.rmtree(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_the_previous_output(case, case_dir, tiny_corpus, tiny_tokenizer_dir,
                                                                    tiny_model_dir, tiny_params, capsys, monkeypatch):
    ctx = Ctx(case_dir, tiny_corpus, tiny_tokenizer_dir, tiny_model_dir)
    previous = ctx.write(f"out/{case.stage}/metrics.json", PREVIOUS)
    kept = ctx.write(f"out/{case.stage}/model/config.json", PREVIOUS)
    rc, err = run_case(case, ctx, tiny_params, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1 and case.expect in errors[0], err
    assert "Traceback" not in err
    assert previous.read_text() == PREVIOUS and kept.read_text() == PREVIOUS
    assert sorted(p.name for p in (ctx.tmp / "out" / case.stage).iterdir()) == ["metrics.json", "model"]
    assert not list((ctx.tmp / "out").glob(".*staging"))


def test_the_table_covers_at_least_25_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


def test_quantize_leaving_out_nf4_replaces_the_stale_folder_with_a_marker(tiny_model_dir, tiny_corpus, tmp_path):
    """dvc.yaml declares out/quantize/nf4: `methods: [int8]` must not leave an old nf4 model there looking current."""
    from tasks import quantize
    from lmforge.config import QuantizeConfig
    from lmforge.models import check_model_dir
    from lmforge.errors import InputError
    from lmforge.stage import execute

    out = tmp_path / "quantize"
    shutil.copytree(tiny_model_dir, out / "nf4")  # a previous run's nf4 model
    cfg = QuantizeConfig(methods=["int8"], ppl_tokens=256, batch_size=4, gen_tokens=2, gen_repeats=1, num_threads=1)
    execute("quantize", quantize.run, cfg, out, {"model": tiny_model_dir, "corpus": tiny_corpus})
    assert [p.name for p in (out / "nf4").iterdir()] == ["NOT_WRITTEN"]
    assert (out / "int8" / "config.json").is_file()
    with pytest.raises(InputError, match=r"nf4 model: .* was not written: quantize.methods left out nf4"):
        check_model_dir(out / "nf4", "nf4 model")
