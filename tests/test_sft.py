import json
import math

import pytest
import torch

from lmforge.training import finetune, resume
from lmforge import models
from lmforge.data import posttrain_data
from tasks import sft
from lmforge import tracking
from lmforge.config import SftConfig
from lmforge.errors import InputError
from lmforge.stage import execute

TINY = dict(replay_share=0.0, train_examples=64, test_examples=16, max_steps=6, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1,
            eval_batch_size=16, max_new_tokens=4, num_threads=1)


class RecordingTracker(tracking.NullTracker):
    def __init__(self):
        self.logged, self.artifacts = [], []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


def test_labels_cover_assistant_tokens_only(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = SftConfig(**{**TINY, "train_examples": 8})
    tok = models.load_tokenizer(tiny_model_dir)
    trainer = finetune.make_trainer(
        cfg, AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, finetune.training_conversations(cfg),
        posttrain_data.conversations("test", 4, 0), tmp_path / "work", "cpu", tracking.NullTracker(), [],
    )
    rows = posttrain_data.conversations("train", 8, 0)
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for ex, row in zip(trainer.train_dataset, rows):
        ids, labels = ex["input_ids"], ex["labels"]
        start = ids.index(assistant) + 1
        assert all(label == -100 for label in labels[:start])  # prompt and role tokens are masked
        assert labels[start:] == ids[start:]  # answer and <|end|> are learnt
        assert tok.decode(ids[start:]) == row["answer"] + "<|end|>"


def test_sft_trains_and_writes_a_loadable_chat_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracker = RecordingTracker()
    out = tmp_path / "sft"
    metrics = execute("sft", sft.run, SftConfig(**TINY), out, {"base": tiny_model_dir}, tracker=tracker)

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "base_eval_loss", "final_eval_loss", "final_accuracy_add",
                "base_accuracy_larger", "train_loss_first", "train_loss_last"):
        assert key in saved and math.isfinite(saved[key]), key
    assert 0.0 <= metrics["final_accuracy"] <= 1.0
    gain = saved["accuracy_gain"]  # paired over the same held-out items, with its bootstrap interval
    assert gain["gain"] == pytest.approx(saved["final_accuracy"] - saved["base_accuracy"], abs=1e-3)
    assert gain["lo"] <= gain["gain"] <= gain["hi"] and gain["n"] == TINY["test_examples"]
    assert metrics["steps"] == TINY["max_steps"]
    assert metrics["final_eval_loss"] < metrics["base_eval_loss"]
    assert [s for s, m in tracker.logged if "train/loss" in m] == list(range(1, TINY["max_steps"] + 1))

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert "{% generation %}" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    assert json.loads((out / "model" / "lmforge.json").read_text())["stage"] == "sft"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == TINY["test_examples"] and {"question", "answer", "base", "final"} <= set(samples[0])
    assert not (out / resume.TRAINER_TMP).exists() and not list(tmp_path.glob(".*staging"))


def test_user_data_files_are_added_and_validated(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Say hi", "completion": "hi"}) + "\n")
    convs = finetune.training_conversations(SftConfig(train_examples=4, data_files=[str(good)]))
    assert len(convs) == 5 and convs[0] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(InputError, match=f"{bad}:1: .*no assistant message"):
        finetune.training_conversations(SftConfig(data_files=[str(bad)]))
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps(posttrain_data.preference_pairs("train", 1, 0)[0]) + "\n")
    with pytest.raises(InputError, match="preference data"):
        finetune.training_conversations(SftConfig(data_files=[str(pref)]))
    with pytest.raises(InputError, match="no training data"):
        finetune.training_conversations(SftConfig(train_examples=0))


def test_cli_reports_bad_data_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    params = tmp_path / "params.yaml"
    params.write_text(f"sft:\n  data_files: [{json.dumps(str(bad))}]\n")
    code = sft.main(["--params", str(params), "--base", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_replay_adds_pretraining_text_as_replies_to_no_question(tiny_corpus, tiny_model_dir):
    from lmforge.data.corpus import iter_texts

    cfg = SftConfig(**{**TINY, "replay_share": 0.5, "max_length": 32})
    pieces = finetune.replay(cfg, tiny_corpus, 10)  # half of all examples: as many as the 10 task conversations
    assert len(pieces) == 10 and all(p == [{"role": "assistant", "content": p[0]["content"]}] for p in pieces)
    train = "\n".join(iter_texts(tiny_corpus, "train"))
    assert all(p[0]["content"] in train and 0 < len(p[0]["content"]) <= 96 for p in pieces)
    short = SftConfig(**{**TINY, "replay_share": 0.5, "replay_tokens": 8})
    assert all(0 < len(p[0]["content"]) <= 24 for p in finetune.replay(short, tiny_corpus, 10))  # 8 tokens' worth
    assert finetune.replay(SftConfig(**{**TINY, "replay_share": 0.0}), None, 10) == []  # off: no corpus needed
    with pytest.raises(InputError, match="replay_share > 0 needs the corpus"):
        finetune.replay(cfg, None, 10)
    tok = models.load_tokenizer(tiny_model_dir)  # the loss falls on the text: it is the assistant's reply
    masked = tok.apply_chat_template(pieces[0], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(masked["assistant_masks"]) >= len(masked["input_ids"]) - 1


def test_packed_batches_give_the_padded_batches_loss_and_still_truncate(tiny_model_dir, tmp_path):
    """A packed batch (conversations end to end in a few rows, position ids restarting at each) must score every
    conversation as if it were alone: the same loss as the padded batch, so no token attends across a conversation boundary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = models.load_tokenizer(tiny_model_dir)
    def trainer(**knobs):
        cfg = SftConfig(**{**TINY, "train_examples": 8, **knobs})
        return finetune.make_trainer(cfg, model, tok, finetune.training_conversations(cfg),
                                     posttrain_data.conversations("test", 4, 0), tmp_path / "work", "cpu",
                                     tracking.NullTracker(), [])

    lengths = sorted(len(e["input_ids"]) for e in trainer().train_dataset)
    assert lengths[0] < lengths[-1]
    cut = lengths[-1] - 1
    trainers = {flat: trainer(padding_free=flat, max_length=cut) for flat in (True, False)}
    examples = list(trainers[True].train_dataset)
    assert max(len(e["input_ids"]) for e in examples) == cut  # TRL still truncates to max_length
    flat, padded = (trainers[f].data_collator(examples) for f in (True, False))
    assert flat["input_ids"].shape[0] < 8 and "attention_mask" not in flat and flat["input_ids"].shape[1] <= cut
    assert (flat["labels"] != -100).sum() == (padded["labels"] != -100).sum()  # every scored token, once
    assert (padded["attention_mask"] == 0).any()  # the padded batch does pad
    assert flat.pop(finetune.REAL_TOKENS) == padded["attention_mask"].sum()  # what the logged num_tokens adds up
    with torch.no_grad():
        losses = [model(**{k: v for k, v in b.items()}).loss for b in (flat, padded)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses
    # leaking attention across conversations would change it: the same rows scored as one sequence each differ
    joined = {k: v for k, v in flat.items() if k != "position_ids"}
    with torch.no_grad():
        assert abs(model(**joined).loss - losses[0]) > 1e-3
    counted = []
    for flat in (True, False):  # the same seed, so the same batches: the logged token counts must agree
        trainers[flat].args.max_steps = 2
        trainers[flat].train()
        counted.append(trainers[flat]._total_train_tokens)
    assert counted[0] == counted[1] > 2 * cut
