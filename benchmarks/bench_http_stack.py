"""Which HTTP stack for the gateway: aiohttp.web vs Starlette on uvicorn (uvloop + httptools).

Each server runs in its own process with one endpoint of each kind:
``GET /trivial`` (a small JSON answer) and ``POST /v1/chat/completions``
(reads a chat body, parses it, waits ``--call-ms`` as a provider call would,
answers a chat-completion-sized JSON).  A load process keeps ``--clients``
requests in flight for ``--seconds`` and counts answers; the server's CPU
is read from /proc.  Needs starlette and uvicorn (not dependencies of the
package): run it with a venv that has them, such as LiteLLM's proxy venv::

    /work/litellm-proxy-venv/bin/python benchmarks/bench_http_stack.py

Also ``--json orjson`` to see whether orjson changes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

BODY = json.dumps({"model": "grok-4.1", "messages": [{"role": "system", "content": "You are terse."},
                                                     {"role": "user", "content": "say hello " * 40}],
                   "max_tokens": 64}).encode()
ANSWER = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "grok-4.1",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello " * 30},
                       "finish_reason": "stop", "logprobs": None}],
          "usage": {"prompt_tokens": 90, "completion_tokens": 30, "total_tokens": 120}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(stack: str, port: int, call_ms: float, use_orjson: bool) -> None:
    if use_orjson:
        import orjson

        dumps, loads = orjson.dumps, orjson.loads
    else:
        def dumps(v: object) -> bytes:
            return json.dumps(v).encode()
        loads = json.loads
    if stack == "aiohttp":
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            if request.path == "/trivial":
                return web.Response(body=dumps({"status": "ok"}), content_type="application/json")
            body = loads(await request.read())
            assert body["model"]
            await asyncio.sleep(call_ms / 1000)
            return web.Response(body=dumps(ANSWER), content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
    else:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def trivial(request: Request) -> Response:
            return Response(dumps({"status": "ok"}), media_type="application/json")

        async def chat(request: Request) -> Response:
            body = loads(await request.body())
            assert body["model"]
            await asyncio.sleep(call_ms / 1000)
            return Response(dumps(ANSWER), media_type="application/json")

        app = Starlette(routes=[Route("/trivial", trivial), Route("/v1/chat/completions", chat, methods=["POST"])])
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error",
                    access_log=False)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, path: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    import aiohttp

    done = 0
    lat: list[float] = []
    stop = time.monotonic() + seconds
    url = f"http://127.0.0.1:{port}{path}"

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop:
            t = time.perf_counter()
            if path == "/trivial":
                async with session.get(url) as r:
                    await r.read()
            else:
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
            lat.append(time.perf_counter() - t)
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done, lat


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--call-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", choices=["json", "orjson"], default="json")
    ap.add_argument("--serve", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.call_ms, args.json == "orjson")
        return
    rows = []
    for rnd in range(args.rounds):
        for stack in (("aiohttp", "starlette") if rnd % 2 == 0 else ("starlette", "aiohttp")):
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", stack, str(port), "--call-ms",
                                     str(args.call_ms), "--json", args.json])
            try:
                wait_port(port)
                asyncio.run(load(port, "/trivial", 4, 0.5))            # warm-up
                for path in ("/trivial", "/v1/chat/completions"):
                    c0 = cpu_seconds(proc.pid)
                    done, lat = asyncio.run(load(port, path, args.clients, args.seconds))
                    cpu = cpu_seconds(proc.pid) - c0
                    lat.sort()
                    rows.append((rnd, stack, path, done / args.seconds, cpu * 1000 / done,
                                 lat[len(lat) // 2] * 1000))
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"{args.clients} clients, {args.seconds:g} s per figure, simulated call {args.call_ms:g} ms, "
          f"json={args.json}")
    print(f"{'round':>5} {'stack':<10} {'endpoint':<22} {'req/s':>8} {'CPU ms/req':>11} {'p50 ms':>8}")
    for rnd, stack, path, rps, cpu, p50 in rows:
        print(f"{rnd:>5} {stack:<10} {path:<22} {rps:>8.0f} {cpu:>11.3f} {p50:>8.1f}")


if __name__ == "__main__":
    main()
