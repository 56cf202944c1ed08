"""`make serve-model` on 127.0.0.1, called with the real `openai` client, and `make chat` fed from a pipe."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(peaked_model, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli.serve", "--params", str(ROOT / "params.yaml"),
                                 "--model", str(peaked_model), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def test_a_chat_completion_follows_the_models_template_and_context(client, peaked_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    reply = client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=6)
    ids = tiny_tokenizer.apply_chat_template(ASK, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens <= 6
    # the same greedy reply as plain transformers.generate on the same folder
    model = AutoModelForCausalLM.from_pretrained(peaked_model).eval()
    out = model.generate(ids, max_new_tokens=6, do_sample=False,
                         eos_token_id=[tiny_tokenizer.convert_tokens_to_ids("<|end|>"), tiny_tokenizer.eos_token_id])
    assert reply.choices[0].message.content == tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert [m.id for m in client.models.list().data] == ["lmforge"]


def test_a_streamed_reply_is_the_same_text(client):
    whole = client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=8).choices[0].message.content
    stream = client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=8, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream]
    assert whole and "".join(chunks) == whole and len(chunks) >= 2  # pieces, then the closing chunk


def test_a_client_that_leaves_mid_stream_does_not_hold_the_model(client, peaked_model):
    stream = client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=100, stream=True)
    next(iter(stream))
    stream.close()  # gone after the first piece: the server stops generating for it
    quick = client.with_options(timeout=60, max_retries=0)
    assert quick.chat.completions.create(model="lmforge", messages=ASK, max_tokens=2).choices[0].message
    from lmforge.serving import Engine

    engine = Engine(str(peaked_model))  # the same in one process: a dropped stream gives the model back
    next(iter(engine.stream(ASK, max_tokens=100)))
    assert engine.reply(ASK, max_tokens=2).completion_tokens  # not queued behind the dropped one for long


def test_an_over_long_prompt_and_a_bad_request_get_400_and_the_server_goes_on(client, server):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lmforge", messages=[{"role": "user", "content": "x " * 500}])
    assert err.value.body["code"] == "context_length_exceeded" and "context is 128 tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="lmforge", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=500)  # past the context
    assert server[1].poll() is None
    assert client.chat.completions.create(model="lmforge", messages=ASK, max_tokens=2).choices[0].message


def test_twenty_concurrent_requests_are_all_answered(client):
    def one(i: int) -> str:
        ask = [{"role": "user", "content": f"What is {i} + {i}?"}]
        return client.chat.completions.create(model="lmforge", messages=ask, max_tokens=4).choices[0].finish_reason

    with ThreadPoolExecutor(20) as pool:
        reasons = list(pool.map(one, range(20)))
    assert len(reasons) == 20 and set(reasons) <= {"stop", "length"}


def test_the_terminal_chat_keeps_history_resets_and_quits(peaked_model):
    script = "What is 2 + 3?\nAnd 4 + 4?\n/reset\n" + "x " * 200 + "\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.chat", "--params", str(ROOT / "params.yaml"), "--model",
                          str(peaked_model), "--max-tokens", "8"], input=script, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model> ") == 2 and "(conversation forgotten)" in out.stdout
    assert "context is 128 tokens" in out.stdout  # the long line is refused, the chat goes on to /quit


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.serve", "--params", str(ROOT / "params.yaml"), "--model",
                          str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: serve:") and "Traceback" not in out.stderr
