"""Nothing unsafe is loaded from a model folder: pickle weights (which run code when unpickled) and configs
naming their own Python classes (auto_map) are refused in one line unless a knob opts in."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from tasks import base
from tasks import sft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pickle_only(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with pytorch_model.bin in place of model.safetensors, as older hub models ship."""
    import torch
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("pickle") / "model"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert (folder / "pytorch_model.bin").is_file()
    return folder


@pytest.fixture(scope="module")
def remote_code(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model whose config names a class in a module of its own, which would write a marker if imported."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("remote") / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('remote code ran')\n")
    return folder


def _params(tmp_path: Path, section: str, **knobs) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({section: knobs}))
    return params


def _stage(main, tmp_path, capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv + ["--out", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


def test_base_refuses_pickle_weights_unless_allowed(pickle_only, tmp_path, capsys):
    rc, err = _stage(base.main, tmp_path, capsys, ["--params", str(_params(tmp_path, "base", source=str(pickle_only)))])
    assert rc == 2 and "holds only pickle weights (pytorch_model.bin)" in err and "Traceback" not in err
    rc, err = _stage(base.main, tmp_path, capsys,  # the knob lets the same folder load
                     ["--params", str(_params(tmp_path, "base", source=str(pickle_only), allow_pickle=True))])
    assert rc == 0 and (tmp_path / "out/model/model.safetensors").is_file(), err


def test_base_refuses_remote_code_unless_trusted(remote_code, tmp_path, capsys):
    rc, err = _stage(base.main, tmp_path, capsys, ["--params", str(_params(tmp_path, "base", source=str(remote_code)))])
    assert rc == 2 and "needs remote code (auto_map: AutoConfig, AutoModelForCausalLM)" in err, err
    assert "base.trust_remote_code: true" in err
    assert not (remote_code / "RAN").exists()


@pytest.mark.parametrize("folder, message", [("pickle_only", "holds only pickle weights"),
                                             ("remote_code", "needs remote code")])
def test_post_training_stages_refuse_unsafe_model_folders(folder, message, request, tmp_path, capsys):
    base = request.getfixturevalue(folder)
    rc, err = _stage(sft.main, tmp_path, capsys, ["--params", str(_params(tmp_path, "sft")), "--base", str(base)])
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (base / "RAN").exists()


def test_every_from_pretrained_call_says_trust_remote_code():
    """transformers' default is False today; lmforge says so at every call, so a changed default changes nothing."""
    missing = []
    for file in sorted([*(ROOT / "tasks").rglob("*.py"), *(ROOT / "lmforge").rglob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"
                    and getattr(node.func.value, "id", None) != "PeftModel"):  # an adapter lmforge just wrote
                names = {k.arg for k in node.keywords}
                if "trust_remote_code" not in names and None not in names:  # None: **kwargs set it (models.py)
                    missing.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing
