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
import json
import os
import signal
import socket
import statistics
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


def start_gateway(base_url: str, workdir: Path, workers: int = 1, redis: str | None = None,
                  name: str = "gateway") -> Target:
    port = free_port()
    cfg = workdir / f"{name}.yaml"
    llm: dict[str, Any] = {"backends": [{
        "provider": "openai", "name": "fake", "base_url": base_url, "api_key_env": "BENCH_FAKE_KEY",
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


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough HTTP to post a body and read the answer.

    The load generator shares the machine's two cores with the servers it
    measures, so it is kept cheap: about a tenth of aiohttp's client CPU per
    request.  Reads a Content-Length body or a chunked one (SSE streams).
    """

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        payload = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (f"POST {parts.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{head}\r\n"
                        ).encode() + payload
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        else:
            at = lower.index(b"content-length:") + 15
            body = await self.reader.readexactly(int(lower[at:lower.index(b"\r\n", at)]))
        if b"connection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def run_load(target: Target, clients: int, seconds: float, stream: bool) -> dict[str, Any]:
    """``clients`` loops posting chat completions for ``seconds``; answers/s, latencies, server CPU."""
    body = {**BODY, "stream": True} if stream else BODY
    lat: list[float] = []
    errors = 0
    stop_at = 0.0

    async def client(conn: Connection) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                status, data = await conn.post()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn.close()
                errors += 1
                continue
            if status != 200 or (stream and b"[DONE]" not in data):
                errors += 1
            else:
                lat.append(time.perf_counter() - t)

    conns = [Connection(target.url + "/chat/completions", body, target.headers) for _ in range(clients)]
    try:
        stop_at = time.monotonic() + min(1.0, seconds / 3)           # warm-up, not measured
        await asyncio.gather(*(client(c) for c in conns))
        lat.clear()
        errors = 0
        cpu0, t0 = target.cpu(), time.perf_counter()
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client(c) for c in conns))
        wall, cpu = time.perf_counter() - t0, target.cpu() - cpu0
    finally:
        for c in conns:
            c.close()
    return {"lat": lat, "wall": wall, "cpu": cpu, "errors": errors}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures over several rounds of one target: answers/s, p50/p99 ms, CPU ms per answer, errors."""
    lat = sorted(x for r in rounds for x in r["lat"])
    n, wall, cpu = len(lat), sum(r["wall"] for r in rounds), sum(r["cpu"] for r in rounds)
    return {"rps": n / wall, "p50": lat[n // 2] * 1000 if n else float("nan"),
            "p99": lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
            "cpu_ms": cpu * 1000 / n if n else float("nan"), "n": n,
            "errors": sum(r["errors"] for r in rounds)}


def interleaved(targets: list[Target], clients: int, seconds: float, stream: bool,
                rounds: int) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` rounds of every target, in turn and in alternating order (A B C, C B A, ...), so that
    the machine's drift (other tenants, CPU frequency) falls on all of them alike."""
    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for i in range(rounds):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            out[t.name].append(asyncio.run(run_load(t, clients, seconds, stream)))
    return out


def per_round(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of ``a`` over ``key`` of ``b``, round by round."""
    return [summary([x])[key] / summary([y])[key] for x, y in zip(a, b)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round (default 3)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per figure, targets taken in turn (default 2; the 64-client figures: 2x this)")
    ap.add_argument("--clients", default="1,16,64", help="concurrent clients (default 1,16,64)")
    ap.add_argument("--proxy-venv", default="/work/litellm-proxy-venv",
                    help="venv with LiteLLM's proxy (default /work/litellm-proxy-venv)")
    ap.add_argument("--no-proxy", action="store_true", help="measure the gateway alone")
    ap.add_argument("--workers", action="store_true",
                    help="instead: one worker vs --workers 2, both on one Redis (shared_state), plain calls")
    args = ap.parse_args()
    if args.workers:
        return scaling(args.seconds, [int(c) for c in args.clients.split(",")], args.rounds)
    levels = [int(c) for c in args.clients.split(",")]
    venv = Path(args.proxy_venv)
    proxy_note = ""
    if args.no_proxy:
        proxy_note = "LiteLLM's proxy not measured (--no-proxy)"
    elif not (venv / "bin" / "litellm").exists():
        proxy_note = f"LiteLLM's proxy not measured: no {venv}/bin/litellm (see benchmarks/README.md)"
    results: dict[tuple[str, bool, int], dict[str, Any]] = {}
    raw: dict[tuple[bool, int], dict[str, list[dict[str, Any]]]] = {}
    with SimProcess() as sim, tempfile.TemporaryDirectory() as tmp:
        targets = [Target("direct", sim.base_url("fake"))]
        try:
            targets.append(start_gateway(sim.base_url("fake"), Path(tmp)))
            if not proxy_note:
                try:
                    targets.append(start_proxy(sim, Path(tmp), venv))
                except RuntimeError as exc:
                    proxy_note = f"LiteLLM's proxy not measured: {exc}"
            for stream in (False, True):
                for clients in levels:
                    rounds = args.rounds * (2 if clients == 64 else 1)
                    raw[(stream, clients)] = got = interleaved(targets, clients, args.seconds, stream, rounds)
                    for name, rs in got.items():
                        results[(name, stream, clients)] = summary(rs)
        finally:
            for t in targets:
                t.stop()
    names = [t.name for t in targets]
    print(f"\n{args.rounds} rounds of {args.seconds:g} s per figure ({2 * args.rounds} at 64 clients), targets in "
          f"turn, each after a warm-up; fake provider answering at once; one worker each")
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
        print("\ntargets at 64 clients (gateway / proxy), the median of the rounds' ratios (range): "
              "req/s >= 2x, added p50 <= 0.5x")
        for stream in (False, True):
            if 64 not in levels:
                break
            rs = raw[(stream, 64)]
            rps = per_round(rs["gateway"], rs["litellm-proxy"], "rps")
            cpu = per_round(rs["gateway"], rs["litellm-proxy"], "cpu_ms")
            added = [(summary([g])["p50"] - summary([d])["p50"]) / (summary([p])["p50"] - summary([d])["p50"])
                     for g, p, d in zip(rs["gateway"], rs["litellm-proxy"], rs["direct"])]
            r, a, c = (statistics.median(x) for x in (rps, added, cpu))
            print(f"  {'stream' if stream else 'plain':<7} req/s {r:.2f}x ({min(rps):.2f}-{max(rps):.2f}) "
                  f"{'PASS' if r >= 2 else 'FAIL'}   added p50 {a:.2f}x ({min(added):.2f}-{max(added):.2f}) "
                  f"{'PASS' if a <= 0.5 else 'FAIL'}   CPU per request {c:.2f}x ({min(cpu):.2f}-{max(cpu):.2f})")
    return 0


def scaling(seconds: float, levels: list[int], rounds: int) -> int:
    """Requests per second of ``serve --workers 2`` over one worker, both with Redis shared state.

    Rounds alternate the two (1, 2, 2, 1, ...).  The provider is ``_leanfake.py``
    (canned answers): on a 2-core machine every ms the fake provider, the load
    generator and redis-server spend is taken from the workers, and in
    production the provider is on other machines.  That CPU per request is
    shown next to the servers' own.
    """
    redis, url = start_redis()
    fake = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_leanfake.py"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    others: dict[tuple[str, int], list[float]] = {}
    try:
        assert fake.stdout is not None
        base_url = f"http://127.0.0.1:{json.loads(fake.stdout.readline())['port']}/v1"
        with tempfile.TemporaryDirectory() as tmp:
            targets = [start_gateway(base_url, Path(tmp), 1, url, "1-worker"),
                       start_gateway(base_url, Path(tmp), 2, url, "2-workers")]
            try:
                for clients in levels:
                    for i in range(2 * rounds):
                        for t in (targets if i % 2 == 0 else targets[::-1]):
                            before = (tree_cpu(fake.pid), time.process_time(), tree_cpu(redis.pid))
                            r = asyncio.run(run_load(t, clients, seconds, False))
                            after = (tree_cpu(fake.pid), time.process_time(), tree_cpu(redis.pid))
                            results.setdefault((t.name, clients), []).append(r)
                            n = max(1, len(r["lat"]))
                            others.setdefault((t.name, clients), []).append(
                                [(a - b) * 1000 / n for a, b in zip(after, before)])
            finally:
                for t in targets:
                    t.stop()
    finally:
        redis.kill()
        fake.kill()
    print(f"\n{2 * rounds} rounds of {seconds:g} s per figure, taken in turn; plain calls; both on one Redis; "
          f"the load generator, the fake provider and Redis share the machine's 2 cores with the workers")
    for clients in levels:
        one, two = results[("1-worker", clients)], results[("2-workers", clients)]
        ratios = per_round(two, one, "rps")
        s1, s2 = summary(one), summary(two)
        print(f"  {clients:>3} clients: 1 worker {s1['rps']:>6.0f} req/s, 2 workers {s2['rps']:>6.0f} req/s: "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; target >= 1.6x)  "
              f"errors {s1['errors']}/{s2['errors']}")
        for name, figures in (("1 worker", s1), ("2 workers", s2)):
            fake_ms, load_ms, redis_ms = (statistics.median(x) for x in zip(*others[(name.replace(" ", "-"), clients)]))
            print(f"       {name:<9}: CPU ms per request: server {figures['cpu_ms']:.2f}, fake provider "
                  f"{fake_ms:.2f}, load generator {load_ms:.2f}, redis-server {redis_ms:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
