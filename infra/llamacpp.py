"""llama.cpp itself, to prove an exported GGUF file runs where users run it: llama-cpp-python, built from its source
distribution into its own virtual environment (infra/.venv-llama, by `python -m infra prereqs`; no binary wheel of
it installs here, and the prebuilt libraries on the registry need a newer glibc than Debian 12's). The checks run
in that interpreter as a subprocess and answer in JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from infra.prereqs import LLAMA_ENV

SCRIPT = r"""
import json, sys
from llama_cpp import Llama
ask = json.load(sys.stdin)
llm = Llama(model_path=ask["gguf"], n_ctx=ask["n_ctx"], n_threads=2, seed=0, verbose=False)
out = {"metadata": {k: v for k, v in llm.metadata.items() if k.startswith(("general.", "tokenizer.ggml.pre"))},
       "tokens": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in ask["texts"]], "replies": []}
for messages in ask["chats"]:  # the chat template inside the file renders the prompt
    r = llm.create_chat_completion(messages, max_tokens=ask["max_tokens"], temperature=0.0, top_k=1,
                                   repeat_penalty=1.0)
    out["replies"].append(r["choices"][0]["message"]["content"])
out["greedy"], out["greedy_text"] = [], []
for prompt in ask["prompts"]:  # a prompt rendered elsewhere: the next tokens, greedy, until a turn ends
    ids = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), top_k=1, top_p=1.0,
                              temp=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == token or token in ask["stop_ids"] or len(ids) == ask["max_tokens"]:
            break
        ids.append(token)
    out["greedy"].append(ids)
    out["greedy_text"].append(llm.detokenize(ids).decode("utf-8", errors="ignore"))
print(json.dumps(out))
"""


def check(gguf: Path, texts: list[str], chats: list[list[dict]], prompts: list[str] = (), stop_ids: list[int] = (),
          max_tokens: int = 16, n_ctx: int = 128) -> dict:
    """llama.cpp's tokens for each of `texts`, its greedy reply to each of `chats` (through the file's own chat
    template), and its greedy token ids after each of `prompts` (up to a token of `stop_ids`), with the file's
    metadata."""
    python = LLAMA_ENV / "bin" / "python"
    ask = {"gguf": str(gguf), "texts": texts, "chats": chats, "prompts": list(prompts), "stop_ids": list(stop_ids),
           "max_tokens": max_tokens, "n_ctx": n_ctx}
    done = subprocess.run([str(python), "-c", SCRIPT], input=json.dumps(ask), capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp could not run {gguf.name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
