"""A lean fake OpenAI provider for the scaling benchmark: canned answers, next to no CPU.

``bench_gateway.py --workers`` measures how requests per second grow from one
gateway worker to two on a 2-core machine.  The package's simulator (a full
aiohttp server that models each provider) costs a few ms of CPU per request
on those same two cores; in production the provider runs on other machines.
This one answers ``POST .../chat/completions`` with a fixed completion (or the
same as an SSE stream when the body asks for ``"stream": true``), over
keep-alive HTTP/1.1 written by hand on asyncio's transports.

    python benchmarks/_leanfake.py      # prints {"port": N}, serves until stdin closes
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

USAGE = {"prompt_tokens": 19, "completion_tokens": 8, "total_tokens": 27,
         "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
TEXT = "Hello from fake: say hello to the benchmark"


def _completion() -> bytes:
    return json.dumps({
        "id": "chatcmpl-lean", "object": "chat.completion", "created": int(time.time()), "model": "gpt-4o",
        "system_fingerprint": "fp_lean", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                                     "message": {"role": "assistant", "content": TEXT}}],
        "usage": USAGE}).encode()


def _stream() -> bytes:
    def event(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> bytes:
        body = {"id": "chatcmpl-lean", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": "gpt-4o", "system_fingerprint": "fp_lean",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices
                else [], "usage": usage}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    words = TEXT.split(" ")
    out = event({"role": "assistant", "content": ""})
    out += b"".join(event({"content": (" " if i else "") + w}) for i, w in enumerate(words))
    out += event({}, "stop") + event({}, None, USAGE, choices=False) + b"data: [DONE]\n\n"
    return out


def _response(body: bytes, content_type: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


PLAIN = _response(_completion(), b"application/json")
STREAM = _response(_stream(), b"text/event-stream")


class Fake(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            size = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
            if len(self.buf) < end + 4 + size:
                return
            body, self.buf = self.buf[end + 4:end + 4 + size], self.buf[end + 4 + size:]
            self.transport.write(STREAM if b'"stream": true' in body or b'"stream":true' in body else PLAIN)


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Fake, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)     # until the parent closes our stdin
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
