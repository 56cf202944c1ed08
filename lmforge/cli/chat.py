"""`make chat`: a terminal chat with the champion (or any model folder), the reply streamed as it is generated.

    python -m lmforge.cli.chat [--model models:/lmforge@champion | out/sft/model] [--system "You are ..."]
                               [--max-tokens 256]

Commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves. A conversation that outgrows the model's
context says so and keeps what came before; /reset starts afresh.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.errors import ConfigError, InputError
from lmforge.serving import Engine, TooLong, from_params


def talk(engine: Engine, system: str | None, read=input, write=sys.stdout.write, max_tokens: int = 256) -> None:
    """The loop, with its input and output as arguments (a test drives it without a terminal)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write(f"chatting with {engine.name} (context {engine.context} tokens): /reset forgets, /quit leaves\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = list(start)
            write("(conversation forgotten)\n")
            continue
        if not line:
            continue
        asked = [*history, {"role": "user", "content": line}]
        try:
            room = engine.prompt(asked, None)[1]
            pieces = engine.stream(asked, max_tokens=min(max_tokens, room))
        except TooLong as err:
            write(f"({err}; /reset to start again)\n")
            continue
        write("model> ")
        reply = ""
        for piece in pieces:
            reply += piece
            write(piece)
            getattr(sys.stdout, "flush", lambda: None)()
        write("\n")
        history = [*asked, {"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.cli.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file with a `serve` section (the defaults)")
    ap.add_argument("--model", help="registry URI or model folder (serve.model)")
    ap.add_argument("--system", help="a system message at the start of every conversation")
    ap.add_argument("--max-tokens", type=int, help="new tokens per reply at most (serve.max_tokens)")
    args = ap.parse_args(argv)
    try:
        cfg, engine = from_params(args.params, args.model)
    except (ConfigError, InputError) as err:
        print(f"error: chat: {err}", file=sys.stderr)
        return 2
    talk(engine, args.system, max_tokens=args.max_tokens or cfg.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
