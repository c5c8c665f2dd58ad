"""Shared state in Redis (issue 7): per-call cost against in-memory state, and one quota for a fleet.

    python benchmarks/bench_redis.py                  # about 2.5 minutes on 2 cores
    python benchmarks/bench_redis.py --fleet-seconds 30 --rounds 4

Needs ``redis-server`` on the PATH (Debian: ``apt-get install redis-server``);
it starts its own on a free port of 127.0.0.1 and stops it at the end.

Sections:

* ``cost``  per-call wall and CPU ms of ``complete()`` with ``shared_state`` (Redis
  limits, cooldown check, usage totals written before the call returns) against
  the in-memory state, sequentially and with 64 calls in flight; limits set
  but not binding.  Rounds alternate A/B/B/A; ratios are medians of per-round ratios.
  Then the same sequentially with ``rate_limit_rpm`` and two budgets (agent and
  global) on every call, and Redis's own count of the reads (round trips) and
  commands it served per call, from ``INFO stats``.
* ``floor`` what Redis itself costs a call, without LiteLLM: the CPU of one
  admission (ENTER), its release and its usage record, in a loop, with
  redis-py's own reply parser and with hiredis (in alternating subprocesses).
* ``fleet`` four processes (real processes, forked from one that imported
  LiteLLM) hammer one backend with ``rate_limit_tpm`` L and ``max_concurrent``
  for ``--fleet-seconds``; the simulator counts the tokens served.  Shown: the
  tokens in the whole window against what one bucket allows (L at the start
  plus L/60 per second), the steady rate once the first burst is long gone (from a
  quarter of the run, at least 15 s in) in tokens per
  minute against L, and the simulator's peak in flight against max_concurrent.
  The same fleet on in-memory state (each process its own bucket) is run for
  comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets LiteLLM's offline environment first)
from common import MESSAGES, MODEL, table  # noqa: E402

FLEET_WORKER = r'''
import asyncio, json, os, signal, socket, sys, time
sys.path.insert(0, sys.argv[3])
import common
from xml_pipeline_llm import _litellm
_litellm.load()
import litellm.router  # noqa: F401
from xml_pipeline_llm import LLMRouter, load_config
_litellm.token_estimate(common.MODEL, common.MESSAGES, None)

async def run(r, cmd):
    delay = cmd["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    calls, errors = [], 0
    async def loop():
        nonlocal errors
        while time.time() < cmd["until"]:
            try:
                resp = await r.complete(common.MODEL, common.MESSAGES, max_tokens=cmd["max_tokens"])
            except Exception:
                errors += 1
                continue
            calls.append((time.time(), resp.usage["total_tokens"]))
    await asyncio.gather(*(loop() for _ in range(cmd["conc"])))
    return {"calls": calls, "errors": errors}

def child(port):
    sock = socket.create_connection(("127.0.0.1", port))
    f = sock.makefile("rw")
    for line in f:
        cmd = json.loads(line)
        r = LLMRouter(load_config({"llm": cmd["llm"]}))
        out = asyncio.run(run(r, cmd))
        f.write(json.dumps(out) + "\n")
        f.flush()
    os._exit(0)

signal.signal(signal.SIGCHLD, signal.SIG_IGN)
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    if os.fork() == 0:
        child(port)
for _ in sys.stdin:
    pass
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("bench_redis: redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        import redis
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ------------------------------------------------------------------ per-call cost

FULL = {"rate_limit_rpm": 10**8}
BUDGETS = [{"scope": "agent", "max_tokens": 10**12}, {"scope": "global", "max_tokens": 10**12, "window": "1d"}]


def cost(sim: common.SimProcess, redis_url: str, rounds: int, n: int, inflight: int) -> None:
    from xml_pipeline_llm import LLMRouter, load_config

    limits = {"rate_limit_tpm": 10**9, "max_concurrent": 100_000}

    def router(shared: bool, full: bool = False) -> Any:
        name = "rb-full" if full else "rb-cost"
        block: dict[str, Any] = {"timeout": 60, "backends": [
            common.backend_entry(sim, name, **limits, **(FULL if full else {}))]}
        if full:
            block["budgets"] = BUDGETS
        if shared:
            block.update(shared_state=redis_url, redis_prefix=f"bench{os.getpid()}")
        return LLMRouter(load_config({"llm": block}))

    routers = {"memory": router(False), "redis": router(True)}
    full = {"memory": router(False, True), "redis": router(True, True)}

    async def seq(r: Any) -> dict[str, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(n):
            await r.complete(MODEL, MESSAGES, agent_id=f"a{i % 10}", max_tokens=64)
        return {"wall_ms": (time.perf_counter() - wall) * 1000 / n, "cpu_ms": (time.process_time() - cpu) * 1000 / n}

    async def tput(r: Any) -> dict[str, float]:
        total = inflight * 4
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with sem:
                await r.complete(MODEL, MESSAGES, agent_id=f"a{i % 10}", max_tokens=64)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.perf_counter() - wall
        return {"rps": total / elapsed, "cpu_ms": (time.process_time() - cpu) * 1000 / total}

    import redis

    server = redis.Redis.from_url(redis_url)

    async def trips(r: Any) -> dict[str, float]:
        """Redis's reads (one per round trip) and commands per sequential call."""
        before = server.info("stats")
        await seq(r)
        after = server.info("stats")
        return {k: (after[f"total_{k}_processed"] - before[f"total_{k}_processed"]) / n
                for k in ("reads", "commands")}

    async def main() -> dict[str, dict[str, list[dict[str, float]]]]:
        for r in [*routers.values(), *full.values()]:   # warm up: imports, tokenizer, connections
            for _ in range(5):
                await r.complete(MODEL, MESSAGES, max_tokens=64)
        out: dict[str, dict[str, list[dict[str, float]]]] = {
            kind: {k: [] for k in routers} for kind in ("seq", "tput", "full")}
        out["trips"] = {"limits": [], "full": []}
        for rnd in range(rounds):
            order = list(routers) if rnd % 2 == 0 else list(reversed(routers))
            for name in order:
                out["seq"][name].append(await seq(routers[name]))
            for name in order:
                out["tput"][name].append(await tput(routers[name]))
            for name in order:
                out["full"][name].append(await seq(full[name]))
        out["trips"]["limits"].append(await trips(routers["redis"]))
        out["trips"]["full"].append(await trips(full["redis"]))
        return out

    res = asyncio.run(main())
    server.close()

    def med(kind: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in res[kind][name])

    def rat(kind: str, key: str) -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(res[kind]["redis"], res[kind]["memory"]))

    table(["figure", "memory", "redis", "redis / memory"], [
        ["sequential wall ms/call", med("seq", "memory", "wall_ms"), med("seq", "redis", "wall_ms"),
         rat("seq", "wall_ms")],
        ["sequential CPU ms/call", med("seq", "memory", "cpu_ms"), med("seq", "redis", "cpu_ms"),
         rat("seq", "cpu_ms")],
        [f"{inflight} in flight: req/s", med("tput", "memory", "rps"), med("tput", "redis", "rps"),
         rat("tput", "rps")],
        [f"{inflight} in flight: CPU ms/call", med("tput", "memory", "cpu_ms"), med("tput", "redis", "cpu_ms"),
         rat("tput", "cpu_ms")],
        ["+ rpm, 2 budgets: seq CPU ms/call", med("full", "memory", "cpu_ms"), med("full", "redis", "cpu_ms"),
         rat("full", "cpu_ms")],
    ], title=f"per-call cost, {rounds} rounds of {n} sequential calls and {inflight * 4} calls "
             f"{inflight} at a time (simulator latency 0)")
    table(["sequential, per call", "Redis round trips", "Redis commands"], [
        ["limits (tpm, max_concurrent)", res["trips"]["limits"][0]["reads"], res["trips"]["limits"][0]["commands"]],
        ["limits + rate_limit_rpm + 2 budgets", res["trips"]["full"][0]["reads"],
         res["trips"]["full"][0]["commands"]],
    ], title="what Redis served (INFO stats: reads processed, commands processed)")


# ------------------------------------------------------------------ floor

FLOOR = r'''
import asyncio, sys, time
if sys.argv[2] == "python":
    sys.modules["hiredis"] = None          # redis-py then uses its own parser
from xml_pipeline_llm.shared.state import RedisState
from xml_pipeline_llm.usage import make_event

async def main():
    state = RedisState(sys.argv[1], f"floor{time.time_ns()}")
    gate = state.gate("floor", 100_000, 10**9)
    event = make_event(agent_id="a", thread_id=None, model="gpt-4o", backend="floor", provider="openai",
                       usage={"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
                       cost_usd=0.0001, latency_ms=3.0, outcome="ok", call_id="x")
    n = int(sys.argv[3])
    for warm in (True, False):
        cpu = time.process_time()
        for _ in range(200 if warm else n):
            held = await gate.enter(100)
            gate.leave(held, 30)
            await state.usage.append(event)
    print((time.process_time() - cpu) / n * 1e6)
    await state.close()

asyncio.run(main())
'''


def floor(redis_url: str, rounds: int) -> None:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        print("floor: hiredis is not installed (pip install hiredis); skipped")
        return
    got: dict[str, list[float]] = {"python": [], "hiredis": []}
    for rnd in range(rounds):
        for parser in (["python", "hiredis"] if rnd % 2 == 0 else ["hiredis", "python"]):
            out = subprocess.run([sys.executable, "-c", FLOOR, redis_url, parser, "3000"], capture_output=True,
                                 text=True, cwd=str(common.REPO), check=True)
            got[parser].append(float(out.stdout.strip().splitlines()[-1]))
    py, hi = statistics.median(got["python"]), statistics.median(got["hiredis"])
    table(["reply parser", "CPU µs per call (admit + release + usage)", "vs redis-py's"],
          [["redis-py (pure Python)", py, 1.0], ["hiredis", hi, hi / py]],
          title=f"what Redis costs a call, without LiteLLM ({rounds} rounds of 3000 sequential calls)")


# ------------------------------------------------------------------ fleet

class Fleet:
    def __init__(self, count: int) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(count)
        self.listener.settimeout(180)
        self.proc = subprocess.Popen([sys.executable, "-c", FLEET_WORKER, str(self.listener.getsockname()[1]),
                                      str(count), str(common.HERE)], stdin=subprocess.PIPE, cwd=str(common.REPO))
        self.conns = []
        for _ in range(count):
            conn, _ = self.listener.accept()
            conn.settimeout(600)
            self.conns.append((conn, conn.makefile("rw")))

    def run(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for _, f in self.conns:
            f.write(json.dumps(cmd) + "\n")
            f.flush()
        return [json.loads(f.readline()) for _, f in self.conns]

    def close(self) -> None:
        for conn, _ in self.conns:
            conn.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)
        self.listener.close()


def fleet(sim: common.SimProcess, redis_url: str, procs: int, tpm: int, conc: int, seconds: float,
          memory_seconds: float) -> None:
    f = Fleet(procs)
    try:
        rows = []
        for shared, secs in ((True, seconds), (False, memory_seconds)):
            if secs <= 0:
                continue
            name = f"rb-fleet-{'redis' if shared else 'memory'}"
            block: dict[str, Any] = {"timeout": 60, "retries": 0, "backends": [
                common.backend_entry(sim, name, rate_limit_tpm=tpm, max_concurrent=conc)]}
            if shared:
                block.update(shared_state=redis_url, redis_prefix=f"fleet{os.getpid()}")
            sim.set_latency(name, 0.05)
            sim.reset_stats(name)
            start = time.time() + 1.0
            replies = f.run({"llm": block, "start_at": start, "until": start + secs, "conc": 8, "max_tokens": 64})
            calls = sorted(c for r in replies for c in r["calls"])
            errors = sum(r["errors"] for r in replies)
            stats = sim.stats(name)
            used = stats["prompt_tokens"] + stats["completion_tokens"]
            end = max([t for t, _ in calls] + [start + secs])
            allowed = tpm + tpm / 60 * (end - start)
            # the steady rate: tokens of the calls that ended after the first full bucket was long
            # gone (from a quarter of the run, at least 15 s in) up to the end of the run
            w0, w1 = start + max(secs / 4, min(15.0, secs / 2)), start + secs
            steady = sum(tok for t, tok in calls if w0 <= t < w1)
            steady_tpm = steady / (w1 - w0) * 60 if secs >= 30 else float("nan")   # n/a: run too short
            rows.append([f"{procs} processes, {'Redis' if shared else 'in-memory'} state", f"{end - start:.1f}",
                         used, int(allowed), used / allowed, steady_tpm, steady_tpm / tpm,
                         stats["peak_in_flight"], errors])
        table(["fleet", "seconds", "tokens served", "one bucket allows", "served / allowed",
               "steady TPM", "steady / limit", "peak in flight", "errors"], rows,
              title=f"one backend, rate_limit_tpm {tpm:,}, max_concurrent {conc}, 8 tasks per process, "
                    f"simulator latency 50 ms")
    finally:
        f.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="cost,floor,fleet")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n", type=int, default=40, help="sequential calls per variant per round")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--tpm", type=int, default=12_000)
    ap.add_argument("--max-concurrent", type=int, default=4)
    ap.add_argument("--fleet-seconds", type=float, default=60.0)
    ap.add_argument("--memory-seconds", type=float, default=15.0,
                    help="the same fleet on in-memory state, for comparison (0: skip)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    common.header("bench_redis: shared state in Redis")
    server = Redis()
    print(f"redis-server on port {server.port}", flush=True)
    try:
        with common.SimProcess() as sim:
            if "fleet" in only:        # first: its worker processes import LiteLLM while nothing else runs
                fleet(sim, server.url, args.procs, args.tpm, args.max_concurrent, args.fleet_seconds,
                      args.memory_seconds)
            if "cost" in only:
                cost(sim, server.url, args.rounds, args.n, args.inflight)
            if "floor" in only:
                floor(server.url, args.rounds)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
