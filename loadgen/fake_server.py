"""A fake OpenAI-compatible server with exact timing, to test the load generator without a model.

POST /v1/chat/completions and /v1/completions stream `max_tokens` tokens (the text " tok" each,
`tokens_per_chunk` to a chunk) on a fixed schedule, measured from when the request arrived:

    chunk i  at  first_token_delay_s + i * inter_token_delay_s

A chat stream opens with a role-only chunk (no content), as vLLM's does; the usage chunk follows
the last token when stream_options.include_usage is set, then `data: [DONE]`. prompt_tokens counts
whitespace-separated words of the prompt's text (or the length of a token-id prompt).
GET /v1/models lists one model.

Failures on demand: request number i (from 0, in arrival order) behaves as
failure_pattern[i % len(failure_pattern)]:
    ""              normal
    "http-NNN"      HTTP status NNN with an OpenAI error body, before any chunk
    "stream-error"  two chunks, then `data: {"error": {...}}` and the end of the stream
    "stall"         one chunk, then nothing until the client gives up
    "drop"          two chunks, then the connection is cut

serve_in_thread(config) runs it under uvicorn on 127.0.0.1, on a free port, in a daemon thread.
`python -m loadgen.fake_server --port 8000` serves it in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

STARTUP_TIMEOUT_S = 10.0
STALL_S = 3600.0


@dataclass(frozen=True)
class FakeServerConfig:
    first_token_delay_s: float = 0.2
    inter_token_delay_s: float = 0.02
    tokens_per_chunk: int = 1
    failure_pattern: tuple[str, ...] = ()
    model: str = "fake"
    default_max_tokens: int = 16


@dataclass
class FakeServer:
    base_url: str
    received: list[dict[str, Any]] = field(default_factory=list)  # request bodies, in arrival order


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "prompt" in body:
        prompt = body["prompt"]
        return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
    words = 0
    for message in body.get("messages", []):
        content = message.get("content") or ""
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        words += sum(len(p.get("text", "").split()) for p in parts if p.get("type") == "text")
    return words


def _sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


class _Streamer:
    """The chunks of one request, on the configured schedule."""

    def __init__(self, config: FakeServerConfig, body: dict[str, Any], chat: bool, behaviour: str) -> None:
        self._config = config
        self._chat = chat
        self._behaviour = behaviour
        self._num_tokens = int(body.get("max_tokens") or config.default_max_tokens)
        self._num_prompt_tokens = _prompt_tokens(body)
        self._include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._arrived_at = time.perf_counter()

    def _chunk(self, text: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": "fake",
            "created": int(time.time()),
            "model": self._config.model,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
        }
        if text is None:
            chunk["choices"] = []
        elif self._chat:
            chunk["choices"] = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
        else:
            chunk["choices"] = [{"index": 0, "text": text, "finish_reason": None}]
        if usage:
            chunk["usage"] = usage
        return chunk

    async def _sleep_until(self, offset_s: float) -> None:
        await asyncio.sleep(max(0.0, self._arrived_at + offset_s - time.perf_counter()))

    async def events(self) -> AsyncIterator[bytes]:
        if self._chat:
            yield _sse(
                {
                    "id": "fake",
                    "object": "chat.completion.chunk",
                    "model": self._config.model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                }
            )
        per_chunk = self._config.tokens_per_chunk
        for i in range(math.ceil(self._num_tokens / per_chunk)):
            await self._sleep_until(self._config.first_token_delay_s + i * self._config.inter_token_delay_s)
            if i == 2 and self._behaviour == "stream-error":
                yield _sse({"error": {"message": "fake failure mid-stream", "type": "InternalServerError"}})
                return
            if i == 2 and self._behaviour == "drop":
                raise ConnectionAbortedError("fake connection cut")
            if i == 1 and self._behaviour == "stall":
                await asyncio.sleep(STALL_S)
            yield _sse(self._chunk(" tok" * min(per_chunk, self._num_tokens - i * per_chunk)))
        if self._include_usage:
            usage = {
                "prompt_tokens": self._num_prompt_tokens,
                "completion_tokens": self._num_tokens,
                "total_tokens": self._num_prompt_tokens + self._num_tokens,
            }
            yield _sse(self._chunk(None, usage))
        yield _sse("[DONE]")


def create_app(config: FakeServerConfig, received: list[dict[str, Any]] | None = None) -> FastAPI:
    app = FastAPI()
    counter = itertools.count()
    log = received if received is not None else []

    async def complete(request: Request, chat: bool) -> Any:
        body = await request.json()
        log.append(body)
        number = next(counter)
        behaviour = config.failure_pattern[number % len(config.failure_pattern)] if config.failure_pattern else ""
        if behaviour.startswith("http-"):
            status = int(behaviour.removeprefix("http-"))
            return JSONResponse({"error": {"message": f"fake HTTP {status}", "code": status}}, status_code=status)
        return StreamingResponse(_Streamer(config, body, chat, behaviour).events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model, "object": "model", "owned_by": "tristage"}]}

    return app


@contextmanager
def serve_in_thread(config: FakeServerConfig) -> Iterator[FakeServer]:
    """Serve on 127.0.0.1 (a free port) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    fake = FakeServer(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, fake.received), log_level="critical", lifespan="off", timeout_graceful_shutdown=1
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible server with exact timing.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--first-token-delay", type=float, default=0.2, help="seconds")
    parser.add_argument("--inter-token-delay", type=float, default=0.02, help="seconds")
    args = parser.parse_args(argv)
    config = FakeServerConfig(args.first_token_delay, args.inter_token_delay)
    uvicorn.run(create_app(config), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
