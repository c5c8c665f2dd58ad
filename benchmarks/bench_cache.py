"""What the response cache (``llm.cache``) costs and saves, per call (issue 26).

    python benchmarks/bench_cache.py                  # ~1 min on 2 cores
    python benchmarks/bench_cache.py --rounds 6 --n 100

* ``hit``   CPU per call of a cache hit (memory store) vs a provider call through the router
            (no cache), sequential; target: a hit costs <= 0.2x.
* ``miss``  CPU per call of a miss with the cache configured (memory store: key, lookup, single-flight
            bookkeeping, store) vs the same call with no cache; target: <= 1.05x.
* ``redis`` Redis round trips per hit with ``store: redis`` (counted at the client: every pipeline
            the package sends), and the commands each hit issues (Redis INFO commandstats); target:
            <= 1 round trip per hit for the lookup.

Everything runs in this process against the simulator in its own process (its CPU is not counted);
the A and B variants alternate round by round (A B B A) so machine noise cancels, and ratios are
medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import MODEL, table, verdict  # noqa: E402

CALL = {"max_tokens": 64, "temperature": 0}


async def cpu_per_call(router: Any, n: int, texts: list[str]) -> float:
    """CPU seconds per call, ``n`` sequential calls with the given user texts (cycled)."""
    start = time.process_time()
    for i in range(n):
        await router.complete(MODEL, [{"role": "user", "content": texts[i % len(texts)]}], agent_id="bench", **CALL)
    return (time.process_time() - start) / n


async def one_call(router: Any, text: str) -> float:
    start = time.process_time()
    await router.complete(MODEL, [{"role": "user", "content": text}], agent_id="bench", **CALL)
    return time.process_time() - start


async def alternate(a: Any, b: Any, rounds: int, n: int, texts_a: Any, texts_b: Any) -> list[tuple[float, float]]:
    """Per round: the median CPU per call of ``a`` and of ``b``, their calls interleaved one by one
    (A B B A ...), so that whatever else the machine does falls on both alike."""
    out = []
    for r in range(rounds):
        ta, tb = texts_a(r), texts_b(r)
        got: tuple[list[float], list[float]] = ([], [])
        for i in range(n):
            pair = [(0, a, ta[i % len(ta)]), (1, b, tb[i % len(tb)])]
            for idx, router, text in (pair if i % 2 == 0 else pair[::-1]):
                got[idx].append(await one_call(router, text))
        out.append((statistics.median(got[0]), statistics.median(got[1])))
    return out


def median_ratio(pairs: list[tuple[float, float]]) -> tuple[float, str]:
    rs = sorted(x / y for x, y in pairs if y)
    return statistics.median(rs), f"{rs[0]:.2f}-{rs[-1]:.2f}"


async def bookkeeping(router: Any, n: int) -> float:
    """CPU seconds per miss spent in the cache itself: key, lookup, flight, store (no provider call)."""
    from xml_pipeline_llm.options import CallOptions
    from xml_pipeline_llm.response import LLMResponse

    cache, tag = router.cache, uuid.uuid4().hex
    resp = LLMResponse("Hello from the benchmark", MODEL, {"prompt_tokens": 20, "completion_tokens": 5,
                                                         "total_tokens": 25}, "stop", backend="bc-cached")
    start = time.process_time()
    for i in range(n):
        plan = cache.plan(MODEL, [{"role": "user", "content": f"own {tag} {i}"}], dict(CALL), "bench", None, {},
                          CallOptions())
        await cache.obtain(plan)
        await cache.answered(plan, resp)
    return (time.process_time() - start) / n


async def hit_and_miss(sim: common.SimProcess, rounds: int, n: int) -> bool:
    plain = common.make_router([common.backend_entry(sim, "bc-plain")])
    cached = common.make_router([common.backend_entry(sim, "bc-cached")], cache={"store": "memory",
                                                                                 "max_entries": 1_000_000})
    for r in (plain, cached):            # LiteLLM imported, first-call costs paid
        await cpu_per_call(r, 5, [f"warm {uuid.uuid4()}"])
    await cpu_per_call(cached, 1, ["the cached question"])
    tag = uuid.uuid4().hex

    # a hit vs a provider call (both through the router)
    hits = await alternate(cached, plain, rounds, n, lambda r: ["the cached question"],
                           lambda r: [f"plain {tag} {r} {i}" for i in range(n)])
    hit_ratio, hit_spread = median_ratio(hits)
    # a miss with the cache configured vs the same call without it (every text new: every call a miss)
    misses = await alternate(cached, plain, rounds, n, lambda r: [f"miss {tag} {r} {i}" for i in range(n)],
                             lambda r: [f"nocache {tag} {r} {i}" for i in range(n)])
    miss_ratio, miss_spread = median_ratio(misses)
    own = await bookkeeping(cached, n * 10)         # the cache's own code on a miss, measured alone
    call_cpu = sorted(p for _, p in misses)[len(misses) // 2]
    hit_ok, miss_ok = hit_ratio <= 0.2, miss_ratio <= 1.05
    table(["figure", "A CPU ms/call", "B CPU ms/call", "A/B (median)", "per-round range", "target", "verdict"], [
        ["hit (memory) vs provider call", sorted(h for h, _ in hits)[len(hits) // 2] * 1000,
         sorted(p for _, p in hits)[len(hits) // 2] * 1000, hit_ratio, hit_spread, "<= 0.2", verdict(hit_ok)],
        ["miss, cache on vs cache off", sorted(m for m, _ in misses)[len(misses) // 2] * 1000,
         sorted(p for _, p in misses)[len(misses) // 2] * 1000, miss_ratio, miss_spread, "<= 1.05",
         verdict(miss_ok)],
        ["miss: the cache's own code alone", own * 1000, call_cpu * 1000, 1 + own / call_cpu, "",
         "<= 1.05", verdict(1 + own / call_cpu <= 1.05)],
    ], title=f"CPU per sequential call ({rounds} rounds x {n} calls each)")
    for r in (plain, cached):
        await r.aclose()
    return hit_ok and miss_ok


async def redis_round_trips(sim: common.SimProcess, n: int) -> bool:
    server = shutil.which("redis-server")
    if server is None:
        print("\nredis: skipped (redis-server is not installed)")
        return True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        db = redis.Redis(port=port, decode_responses=True)
        for _ in range(100):
            try:
                db.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        from xml_pipeline_llm.shared.connection import LoopClient

        exchanges = {"n": 0}
        original = LoopClient._exchange

        async def counted(conn: Any, commands: list[Any]) -> list[Any]:
            exchanges["n"] += 1
            return await original(conn, commands)

        LoopClient._exchange = staticmethod(counted)   # type: ignore[method-assign]
        r = common.make_router([common.backend_entry(sim, "bc-redis")], shared_state=f"redis://127.0.0.1:{port}/0",
                               redis_prefix=f"b{uuid.uuid4().hex[:6]}", cache={"store": "redis"})
        await cpu_per_call(r, 2, ["the cached question"])        # stored; scripts loaded
        db.config_resetstat()
        before = exchanges["n"]
        await cpu_per_call(r, n, ["the cached question"])
        trips = (exchanges["n"] - before) / n
        stats = db.info("commandstats")
        per_hit = {name[len("cmdstat_"):]: v["calls"] / n for name, v in stats.items()
                   if name.startswith("cmdstat_") and name != "cmdstat_config"}
        await r.aclose()
        LoopClient._exchange = staticmethod(original)   # type: ignore[method-assign]
        ok = per_hit.get("get", 0) <= 1.0
        table(["figure", "per hit", "note"], [
            ["round trips (all the package sent)", trips, "the lookup GET + the usage event's script"],
            *[[f"Redis command {k.upper()}", v, ""] for k, v in sorted(per_hit.items())],
            ["lookup round trips", per_hit.get("get", 0), f"target <= 1: {verdict(ok)}"],
        ], title=f"store: redis, {n} sequential hits")
        return ok
    finally:
        proc.terminate()
        proc.wait(10)


async def main_async(args: argparse.Namespace) -> int:
    with common.SimProcess() as sim:
        ok = await hit_and_miss(sim, args.rounds, args.n)
        ok = await redis_round_trips(sim, args.n) and ok
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="A/B rounds (default 6)")
    ap.add_argument("--n", type=int, default=60, help="calls per variant per round (default 60)")
    args = ap.parse_args()
    common.header("bench_cache: what the response cache costs per call")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
