"""`make serve-model`: the champion (or any model folder) behind an OpenAI-compatible API on 127.0.0.1.

    python -m lmforge.cli.serve [--model models:/lmforge@champion | out/sft/model] [--host 127.0.0.1] [--port 8000]

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (`stream: true` sends server-sent events). A request
the API cannot take (a malformed body, a role it does not know, a conversation longer than the model's context)
gets a 400 with an OpenAI-style error and the server goes on. `transformers serve` was the first choice; in
transformers 5.23 it answered a prompt ten times the model's context with 200 and a reply, and a malformed body
with 500, so lmforge keeps its own small app over the same generate().
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import ConfigError, InputError
from lmforge.serving import Engine, TooLong, from_params


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server has no use for
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


def build_app(engine: Engine, default_max_tokens: int):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    api = FastAPI(title="lmforge", description=f"OpenAI-compatible chat with {engine.name}")

    def error(status: int, message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)

    @api.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
        return error(400, f"invalid request: {where}", "invalid_request")

    @api.exception_handler(TooLong)
    async def too_long(request: Request, err: TooLong):
        return error(400, str(err), "context_length_exceeded")

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "context_length": engine.context}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "lmforge", "object": "model", "owned_by": "lmforge",
                                            "source": engine.name, "context_length": engine.context}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [m.model_dump() for m in req.messages]
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:  # the server's default, within what the conversation leaves of the context
            asked = min(default_max_tokens, engine.prompt(messages, None)[1])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": "lmforge"}
        options = {"max_tokens": asked, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        if req.stream:
            cancel = threading.Event()  # set when the client goes away: generation stops at the next token
            pieces = engine.stream(messages, cancel=cancel, **options)  # TooLong here, before the response starts

            async def events():
                try:
                    async for piece in iterate_in_threadpool(pieces):
                        delta = {"object": "chat.completion.chunk", **head,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                              "finish_reason": None}]}
                        yield f"data: {json.dumps(delta)}\n\n"
                    done = {"object": "chat.completion.chunk", **head,
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                    yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"
                finally:
                    cancel.set()

            return StreamingResponse(events(), media_type="text/event-stream")
        reply = await run_in_threadpool(engine.reply, messages, **options)
        return {"object": "chat.completion", **head,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

    return api


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.cli.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file with a `serve` section (the defaults)")
    ap.add_argument("--model", help="registry URI or model folder (serve.model)")
    ap.add_argument("--host", help="address to listen on (serve.host)")
    ap.add_argument("--port", type=int, help="port (serve.port)")
    args = ap.parse_args(argv)
    try:
        cfg, engine = from_params(args.params, args.model)
    except (ConfigError, InputError) as err:
        print(f"error: serve: {err}", file=sys.stderr)
        return 2
    import uvicorn

    host, port = args.host or cfg.host, args.port or cfg.port
    print(f"serving {engine.name} (context {engine.context} tokens) at http://{host}:{port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(build_app(engine, cfg.max_tokens), host=host, port=port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
