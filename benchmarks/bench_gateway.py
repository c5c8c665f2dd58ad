"""The gateway (``xml-pipeline-llm serve``) side by side with LiteLLM's own proxy.

Both serve ``gpt-4o`` from the same fake provider (the package's simulator,
in a process of its own), one worker process each, on this machine.  A load
generator in this process keeps 1, 16 and 64 clients busy for ``--seconds``
each, streaming and not, against: the fake provider directly, the gateway,
and the proxy.  Per target and load: requests/s, p50/p99 latency and what it
adds over calling the fake directly, and the server's CPU ms per request
(user + system of its process tree, from /proc).

LiteLLM's proxy runs from a venv of its own (never the package's):
``--proxy-venv`` (default /work/litellm-proxy-venv; how to build it:
benchmarks/README.md, "LiteLLM's proxy as a peer").  Without it the gateway is measured alone and the
output says so.

    python benchmarks/bench_gateway.py                        # ~2.5 min
    python benchmarks/bench_gateway.py --seconds 8 --clients 1,16,64,128

Targets (issue 24): at 64 clients >= 2x the proxy's requests/s and <= 0.5x its
p50 added latency.  The machine is shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import REPO, SimProcess, proc_cpu_seconds

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "say hello to the benchmark please and thank you"}]
BODY = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    total = proc_cpu_seconds(pid)
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu(int(child))
    except OSError:
        pass
    return total


class Target:
    """Something that answers ``POST <url>/chat/completions``: a server process, or the fake directly."""

    def __init__(self, name: str, url: str, proc: subprocess.Popen[bytes] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.name, self.url, self.proc, self.headers = name, url, proc, headers or {}

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc is not None else float("nan")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            conn.request("GET", parts.path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:g} s")


def start_gateway(sim: SimProcess, workdir: Path, workers: int = 1, redis: str | None = None,
                  name: str = "gateway") -> Target:
    port = free_port()
    cfg = workdir / f"{name}.yaml"
    llm: dict[str, Any] = {"backends": [{
        "provider": "openai", "name": "fake", "base_url": sim.base_url("fake"), "api_key_env": "BENCH_FAKE_KEY",
        "supported_models": ["gpt-4o"], "max_concurrent": 100_000}]}
    if redis:
        llm["shared_state"] = redis
    cfg.write_text(yaml.safe_dump({"llm": llm}))
    env = {**os.environ, "BENCH_FAKE_KEY": "sk-fake", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "xml_pipeline_llm.cli", "serve", "-c", str(cfg), "--port",
                             str(port), "--workers", str(workers)], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return Target(name, f"http://127.0.0.1:{port}/v1", proc)


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away redis-server on 127.0.0.1 for the workers' shared state."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def start_proxy(sim: SimProcess, workdir: Path, venv: Path) -> Target:
    port = free_port()
    cfg = workdir / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "gpt-4o", "litellm_params": {
            "model": "openai/gpt-4o", "api_base": sim.base_url("fake"), "api_key": "sk-fake"}}],
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True}}))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc)
    return Target("litellm-proxy", f"http://127.0.0.1:{port}/v1", proc)


async def run_load(target: Target, clients: int, seconds: float, stream: bool) -> dict[str, Any]:
    """``clients`` loops posting chat completions for ``seconds``; answers/s, latencies, server CPU."""
    import aiohttp

    url = target.url + "/chat/completions"
    body = {**BODY, "stream": True} if stream else BODY
    lat: list[float] = []
    errors = 0
    stop_at = 0.0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            async with session.post(url, json=body, headers=target.headers) as resp:
                data = await resp.read()
            if resp.status != 200 or (stream and b"[DONE]" not in data):
                errors += 1
            else:
                lat.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        stop_at = time.monotonic() + min(1.0, seconds / 3)           # warm-up, not measured
        await asyncio.gather(*(client(session) for _ in range(clients)))
        lat.clear()
        errors = 0
        cpu0, t0 = target.cpu(), time.perf_counter()
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall, cpu = time.perf_counter() - t0, target.cpu() - cpu0
    lat.sort()
    n = len(lat)
    return {"rps": n / wall, "p50": lat[n // 2] * 1000 if n else float("nan"),
            "p99": lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
            "cpu_ms": cpu * 1000 / n if n else float("nan"), "n": n, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per figure (default 4)")
    ap.add_argument("--clients", default="1,16,64", help="concurrent clients (default 1,16,64)")
    ap.add_argument("--proxy-venv", default="/work/litellm-proxy-venv",
                    help="venv with LiteLLM's proxy (default /work/litellm-proxy-venv)")
    ap.add_argument("--no-proxy", action="store_true", help="measure the gateway alone")
    ap.add_argument("--workers", action="store_true",
                    help="instead: one worker vs --workers 2, both on one Redis (shared_state), plain calls")
    args = ap.parse_args()
    if args.workers:
        return scaling(args.seconds, [int(c) for c in args.clients.split(",")])
    levels = [int(c) for c in args.clients.split(",")]
    venv = Path(args.proxy_venv)
    proxy_note = ""
    if args.no_proxy:
        proxy_note = "LiteLLM's proxy not measured (--no-proxy)"
    elif not (venv / "bin" / "litellm").exists():
        proxy_note = f"LiteLLM's proxy not measured: no {venv}/bin/litellm (see benchmarks/README.md)"
    results: dict[tuple[str, bool, int], dict[str, Any]] = {}
    with SimProcess() as sim, tempfile.TemporaryDirectory() as tmp:
        targets = [Target("direct", sim.base_url("fake"))]
        try:
            targets.append(start_gateway(sim, Path(tmp)))
            if not proxy_note:
                try:
                    targets.append(start_proxy(sim, Path(tmp), venv))
                except RuntimeError as exc:
                    proxy_note = f"LiteLLM's proxy not measured: {exc}"
            for stream in (False, True):
                for clients in levels:
                    for t in targets:
                        results[(t.name, stream, clients)] = asyncio.run(run_load(t, clients, args.seconds, stream))
        finally:
            for t in targets:
                t.stop()
    names = [t.name for t in targets]
    print(f"\n{args.seconds:g} s per figure after a warm-up; fake provider answering at once; one worker each")
    if proxy_note:
        print(proxy_note)
    print(f"\n{'mode':<7} {'clients':>7} {'target':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'+p50 ms':>8} {'+p99 ms':>8} {'CPU ms/req':>10} {'errors':>6}")
    for stream in (False, True):
        for clients in levels:
            base = results[("direct", stream, clients)]
            for name in names:
                r = results[(name, stream, clients)]
                added = "" if name == "direct" else f"{r['p50'] - base['p50']:>8.1f} {r['p99'] - base['p99']:>8.1f}"
                cpu = "" if name == "direct" else f"{r['cpu_ms']:>10.2f}"
                print(f"{'stream' if stream else 'plain':<7} {clients:>7} {name:<14} {r['rps']:>8.0f} "
                      f"{r['p50']:>8.1f} {r['p99']:>8.1f} {added:>17} {cpu:>10} {r['errors']:>6}")
    if "litellm-proxy" in names:
        print("\ntargets at 64 clients (gateway / proxy): req/s >= 2x, added p50 <= 0.5x")
        for stream in (False, True):
            if 64 not in levels:
                break
            g, p, d = (results[(n, stream, 64)] for n in ("gateway", "litellm-proxy", "direct"))
            rps = g["rps"] / p["rps"]
            added = (g["p50"] - d["p50"]) / (p["p50"] - d["p50"])
            cpu = g["cpu_ms"] / p["cpu_ms"]
            print(f"  {'stream' if stream else 'plain':<7} req/s {rps:.2f}x {'PASS' if rps >= 2 else 'FAIL'}   "
                  f"added p50 {added:.2f}x {'PASS' if added <= 0.5 else 'FAIL'}   CPU per request {cpu:.2f}x")
    return 0


def scaling(seconds: float, levels: list[int]) -> int:
    """Requests per second of ``serve --workers 2`` over one worker, both with Redis shared state."""
    redis, url = start_redis()
    results: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        with SimProcess() as sim, tempfile.TemporaryDirectory() as tmp:
            targets = [start_gateway(sim, Path(tmp), 1, url, "1-worker"),
                       start_gateway(sim, Path(tmp), 2, url, "2-workers")]
            try:
                for clients in levels:
                    for t in targets:
                        results[(t.name, clients)] = asyncio.run(run_load(t, clients, seconds, False))
            finally:
                for t in targets:
                    t.stop()
    finally:
        redis.kill()
    print(f"\n{seconds:g} s per figure; plain calls; both on one Redis; the load generator and the fake provider "
          f"share the machine's cores")
    for clients in levels:
        one, two = results[("1-worker", clients)], results[("2-workers", clients)]
        print(f"  {clients:>3} clients: 1 worker {one['rps']:>6.0f} req/s, 2 workers {two['rps']:>6.0f} req/s: "
              f"{two['rps'] / one['rps']:.2f}x (target >= 1.6x)  errors {one['errors']}/{two['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
