"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny random Llama, built in seconds, no download."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

from infra.stack import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMFORGE_TRACKING", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core (pytest-xdist)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread each, not every worker on every core
    # flows run without a server start Prefect's ephemeral one on PREFECT_HOME's database: one per worker
    os.environ.setdefault("PREFECT_HOME", os.path.join(tempfile.gettempdir(), f"lmforge-tests-prefect-{worker}"))

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

    from lmforge import chat

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
    """A saved tiny LlamaForCausalLM with the tokenizer beside it, like out/pretrain/model. Its widths fit
    every bitsandbytes kernel (multiples of 64); odd_model_dir has one that does not."""
    return save_llama(tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer, hidden=64, intermediate=128)


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model as the reward stage leaves it (an untrained head is enough here), accuracy 0.9 in its meta."""
    import torch
    from transformers import AutoTokenizer

    from lmforge.training import scoring
    from lmforge.config import RewardConfig
    from lmforge.stage import write_meta

    path = tmp_path_factory.mktemp("rm") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    scoring.load_reward_model(tiny_model_dir, tok.pad_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    write_meta(path, "reward", RewardConfig(), {scoring.ACCURACY_KEY: 0.9})
    return path


def write_corpus(root: Path, n_docs: int = 300) -> Path:
    """A small corpus in the mix stage's format (lmforge/data/corpus.py): two sources, train and val."""
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


# ------------------------------------------------------------------------ bitsandbytes' two CPU paths
def _emulated_packed_gemv(original):
    """bitsandbytes' packed AVX512-BF16 4-bit kernel in plain torch: unpack the repacked weight, scale each
    64-wide block by its (bf16) absmax, multiply. Lets a CPU without the instruction set run every step of
    the packed path (the weight repacking, its shape rules, save/reload) except the native kernel itself.
    Like the native op it has no gradient: its output is detached from the input."""
    import torch

    @torch.no_grad()
    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        n, k = state.shape
        packed = B.reshape(-1, 32)
        idx = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
        idx = idx.reshape(n // 32, k // 2, 32, 2).transpose(-3, -2).reshape(n, k)
        weight = state.code.float()[idx.long()] * state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)
        result = torch.nn.functional.linear(A.float(), weight).to(A.dtype)
        return out.copy_(result) if out is not None else result

    return gemv_4bit


@pytest.fixture(params=["generic", "packed"])
def cpu_4bit_path(request, monkeypatch):
    """Run the test on one of bitsandbytes' two 4-bit CPU paths, whatever this CPU has: `generic`
    (dequantise per matmul: CPUs without AVX512-BF16, and training) or `packed` (eval-mode inference on
    CPUs with AVX512-BF16). Where the CPU lacks the instruction set the packed kernel is emulated (see
    _emulated_packed_gemv); returns (path, "native" | "emulated")."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules

    native = bool(bnb_functional.has_avx512bf16())
    packed = request.param == "packed"
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: packed)  # read by each Linear4bit at build
    if packed and not native:
        monkeypatch.setattr(bnb_functional, "gemv_4bit", _emulated_packed_gemv(bnb_functional.gemv_4bit))
    return request.param, "native" if native or not packed else "emulated"


def save_llama(path: Path, tok, hidden: int, intermediate: int, layers: int = 2, heads: int = 2, kv_heads: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def odd_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose MLP width (96) the packed 4-bit CPU kernel cannot take as an input (down_proj:
    96 % 64 != 0), while its other layers fit: the mixed case a user's model shape produces."""
    return save_llama(tmp_path_factory.mktemp("odd") / "model", tiny_tokenizer, hidden=64, intermediate=96, layers=1)


@pytest.fixture(scope="session")
def peaked_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose next-token choice is decisive (a large initialisation: logits spread over several units),
    so greedy decoding in two engines is a fair comparison; two KV heads for four query heads (GQA)."""
    import torch
    import transformers

    folder = save_llama(tmp_path_factory.mktemp("peaked") / "model", tiny_tokenizer, hidden=64, intermediate=128,
                        heads=4, kv_heads=2)
    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def commit_project(root: Path, run) -> Path:
    """Make `root` (project files copied in) a git + DVC project with one commit; `run(cwd, *cmd)` runs each
    command and fails the test on a non-zero exit."""
    import sys

    run(root, "git", "init", "-q")
    run(root, "git", "config", "user.email", "ci@lmforge.invalid")
    run(root, "git", "config", "user.name", "ci")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "project")
    return root


def _copy_project(dest: Path) -> None:
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("tasks", "lmforge", "flows", "configs"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, dest / name)


def sh(cwd: Path, *cmd: str) -> str:
    import subprocess

    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def wait_http(url: str, proc, log: Path, timeout_s: float = 180.0) -> None:
    """Until `url` answers 200; fails the test with the server's log if `proc` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}) before {url} answered:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def lifecycle_project(tmp_path_factory):
    """A temp copy of the project (git + DVC), where the tiny lifecycle runs once for all tests."""
    root = tmp_path_factory.mktemp("project")
    _copy_project(root)
    return commit_project(root, sh)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (API and UI) on loopback, the flows of the test run reporting to it."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port, log = free_port(), home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # the UI's calls (else port 4200)
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/health", proc, log)
        with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
            yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def lifecycle_run(lifecycle_project, prefect_server):
    """The tiny lifecycle's first flow run in `lifecycle_project`, tracked in its embedded MLflow store."""
    saved = dict(os.environ)
    os.environ.update({"LMFORGE_TRACKING": "on", "LMFORGE_ROOT": str(lifecycle_project)})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        from flows.lifecycle import lifecycle

        results = lifecycle(preset="tiny", root=str(lifecycle_project), experiment="lmforge")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return results


# Under pytest-xdist (`make test`: -n auto --dist loadscope) each module's tests run in one worker, so its module
# fixtures are built once; the modules that read the tiny lifecycle's one flow run share a worker; and the longest
# modules start first, so that no worker is left alone with one at the end.
SHARED_RUN = {"tests/test_ui.py": "tests/test_flow.py"}
LONGEST_FIRST = ("tests/test_flow.py", "tests/test_ui.py", "tests/test_team.py", "tests/test_smollm2.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_RUN.get(module, module)

    config.option.loadscopereorder = False  # keep the collection's order (below), not the most tests first
    return ByModule(config, log)


def pytest_collection_modifyitems(items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep theirs
