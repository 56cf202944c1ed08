"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random Llama, built in seconds, no download."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMFORGE_TRACKING", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _sample_text(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}.")
        lines.append("The quick brown fox jumps over the lazy dog. def add(a, b): return a + b")
    return lines


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks import chat

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [chat.EOS, chat.PAD, chat.SYSTEM, chat.USER, chat.ASSISTANT, chat.END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_sample_text(), trainer=trainer)
    return chat.configure(PreTrainedTokenizerFast(tokenizer_object=tok))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny LlamaForCausalLM with the tokenizer beside it, like out/pretrain/model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_corpus(root: Path, n_docs: int = 300) -> Path:
    """A small corpus in the mix stage's format (tasks/corpus.py): two sources, train and val."""
    import json

    rng = random.Random(1)
    prose = "The interpreter reads the file, compiles it to bytecode and runs it. Names are bound in scopes."
    docs = {
        "prose": [f"{prose} Section {i}. " * 3 for i in range(n_docs)],
        "arithmetic": [
            "\n".join(f"{a} + {b} = {a + b}" for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(12)))
            for _ in range(n_docs)
        ],
    }
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for source, items in docs.items():
        cut = n_docs // 10
        with open(root / "val" / f"{source}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t, "source": source}) + "\n" for t in items[:cut])
        with open(root / "train" / f"{source}-00000.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t, "source": source}) + "\n" for t in items[cut:])
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer.save_pretrained(path)
    return path
