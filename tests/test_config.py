"""Typed configs, presets and params.yaml rendering."""

from pathlib import Path

import pytest

from lmforge.errors import ConfigError
from lmforge.config import SECTIONS, SHARED, STAGES, TRAINING_STAGES, TrainingSection, load_params, load_stage, parse_section
from lmforge.cli.preset import main as preset_main
from lmforge.cli.preset import render_defaults, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"pretrain\.learning_rate: unknown key"):
        parse_section("pretrain", {"learning_rate": 1e-3})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"pretrain\.max_steps: .*integer.*'ten'"):
        parse_section("pretrain", {"max_steps": "ten"})
    with pytest.raises(ConfigError, match=r"mix\.sources\.0\.kind"):
        parse_section("mix", {"sources": [{"name": "x", "kind": "web"}]})


def test_int_accepted_for_float_and_scientific_notation_parses(tmp_path):
    assert parse_section("pretrain", {"lr": 1}).lr == 1.0
    (tmp_path / "p.yaml").write_text("pretrain:\n  lr: 3e-4\n")  # YAML 1.2, as DVC writes it
    assert load_stage("pretrain", tmp_path / "p.yaml").lr == pytest.approx(3e-4)


def test_unknown_section_and_missing_file(tmp_path):
    (tmp_path / "p.yaml").write_text("pretrian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="unknown section.*pretrian"):
        load_params(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="no such params file"):
        load_stage("mix", tmp_path / "absent.yaml")


def test_every_knob_has_a_description():
    for stage, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            assert field.description, f"{stage}.{name} has no description"


def test_training_sections_share_their_base_knobs_with_their_own_defaults():
    base = list(TrainingSection.model_fields)
    assert base == ["seed", "device", "num_threads", "checkpoint_every"]
    for stage in TRAINING_STAGES:
        assert list(SECTIONS[stage].model_fields)[:4] == base, f"{stage} does not lead with the shared knobs"
        with pytest.raises(ConfigError, match=rf"{stage}\.num_threads: .*greater than or equal to 0"):
            parse_section(stage, {"num_threads": -1})
        with pytest.raises(ConfigError, match=rf"{stage}\.device"):
            parse_section(stage, {"device": "tpu"})
    # a stage keeps its own default and description where it redeclares a shared knob
    assert {s: SECTIONS[s]().checkpoint_every for s in TRAINING_STAGES} == {
        "pretrain": 100, "sft": 100, "lora": 100, "reward": 25, "ppo": 5, "dpo": 20, "grpo": 10}
    assert SECTIONS["ppo"].model_fields["checkpoint_every"].description.startswith("updates between")
    assert SECTIONS["pretrain"].model_fields["seed"].description == "seed for initialisation and batch order"
    with pytest.raises(ConfigError, match=r"pretrain\.checkpoint_every: .*greater than 0"):
        parse_section("pretrain", {"checkpoint_every": 0})  # its own loop always checkpoints
    assert parse_section("sft", {"checkpoint_every": 0}).checkpoint_every == 0


def test_default_preset_file_matches_typed_defaults():
    assert (ROOT / "configs/default.yaml").read_text() == render_defaults(), (
        "configs/default.yaml is stale: run `python -m lmforge.cli.preset default --sync-defaults`"
    )


def test_committed_params_is_the_default_preset():
    assert preset_main(["default", "--check", "--params", str(ROOT / "params.yaml"), "--configs", str(ROOT / "configs")]) == 0


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_presets_render_and_round_trip(tmp_path, preset):
    out = tmp_path / "params.yaml"
    assert preset_main([preset, "--params", str(out), "--configs", str(ROOT / "configs")]) == 0
    loaded = load_params(out)
    assert loaded == resolve(preset, ROOT / "configs")
    assert set(loaded) == set(STAGES) | set(SHARED)
    # every knob appears with its comment
    text = out.read_text()
    assert text.count("  # ") >= sum(len(m.model_fields) for m in SECTIONS.values())


def test_bad_preset_names_the_problem(tmp_path, capsys):
    assert preset_main(["nope", "--params", str(tmp_path / "p.yaml"), "--configs", str(ROOT / "configs")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("tokenizer:\n  vocab: 10\n")
    assert preset_main(["bad", "--params", str(tmp_path / "p.yaml"), "--configs", str(tmp_path)]) == 2
    assert "tokenizer.vocab: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()
