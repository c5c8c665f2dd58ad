"""Per-call cost of the guards (issue 25): loops, call caps and degrade configured vs none.

    python benchmarks/bench_guards.py                  # ~1.5 min on 2 cores
    python benchmarks/bench_guards.py --rounds 12 --n 100 --only memory

Sections:

* ``memory``  sequential CPU ms per call of ``complete()`` with ``llm.guards``
  (``repeat_limit`` and ``max_calls_per_thread``, far from binding: every call is
  hashed and counted) and an agent budget with ``degrade``, against none; both
  routers in one worker process, rounds alternating, the figure the median of
  per-round CPU ratios.  Target: <= 1.05x.
* ``redis``   with ``shared_state``: Redis's own count of the reads (one per round
  trip) and commands it served per sequential call (``INFO stats``), with no
  guard configured and with the guards (and a block of another agent, so the
  block list is re-read every half second); and per-call wall and CPU ms.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import MESSAGES, MODEL, med, ratio, table  # noqa: E402

GUARDS = {"repeat_limit": 10**6, "repeat_window": "1h", "max_calls_per_thread": 10**9}
DEGRADE = [{"scope": "agent", "max_tokens": 10**12, "degrade": {"at": 90, "to": MODEL}}]


def memory(args: argparse.Namespace) -> float:
    with common.SimProcess() as sim, common.Workers(sim.url, [
        {"no guards": {"kind": "router", "prefix": "nog"},
         "guards + degrade": {"kind": "router", "prefix": "gua", "guards": GUARDS, "budgets": DEGRADE},
         "budget only": {"kind": "router", "prefix": "bud", "budgets": [{**DEGRADE[0], "degrade": None}]}},
    ]) as ws:
        names = ["no guards", "guards + degrade", "budget only"]
        res = common.alternate([ws.h[n] for n in names], args.rounds, "seq", n=args.n)
        base = res["no guards"]
        rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
                 common.spread(res[n], base, "cpu_ms")] for n in names]
        table(["complete() with", "CPU ms/call", "wall ms/call", "CPU x none", "rounds range"], rows,
              title=f"Guards in memory, sequential (median of {args.rounds} rounds x {args.n} calls)")
        r = ratio(res["guards + degrade"], base, "cpu_ms")
        own = ratio(res["guards + degrade"], res["budget only"], "cpu_ms")
        print(f"guards (loops, call caps) + degrade per call: {r:.3f}x the CPU of none; "
              f"{own:.3f}x the same budget without degrade (target <= 1.05x: {'PASS' if r <= 1.05 else 'FAIL'})")
        return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis(args: argparse.Namespace) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis: skipped (redis-server is not installed)")
        return
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        with common.SimProcess() as sim:
            _redis(args, sim, f"redis://127.0.0.1:{port}/0", port)
    finally:
        proc.terminate()
        proc.wait(10)


def _redis(args: argparse.Namespace, sim: Any, url: str, port: int) -> None:
    import redis as redis_py

    common.quiet_litellm()
    for _ in range(200):
        try:
            redis_py.Redis(port=port).ping()
            break
        except redis_py.ConnectionError:
            time.sleep(0.05)
    server = redis_py.Redis(port=port)
    routers = {
        "no guard": common.make_router([common.backend_entry(sim, "rg-a", **common.NOT_BINDING)], shared_state=url,
                                       redis_prefix="none"),
        "guards": common.make_router([common.backend_entry(sim, "rg-b", **common.NOT_BINDING)], shared_state=url,
                                     redis_prefix="gua", guards=GUARDS),
        "guards + degrade": common.make_router([common.backend_entry(sim, "rg-c", **common.NOT_BINDING)],
                                               shared_state=url, redis_prefix="deg", guards=GUARDS,
                                               budgets=DEGRADE),
    }
    n = args.n

    async def seq(r: Any) -> dict[str, float]:
        before = server.info("stats")
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(n):
            await r.complete(MODEL, MESSAGES, agent_id=f"a{i % 10}", thread_id=f"t{i % 100}", max_tokens=64)
        wall_ms = (time.perf_counter() - wall) * 1000 / n
        cpu_ms = (time.process_time() - cpu) * 1000 / n
        after = server.info("stats")
        return {"wall_ms": wall_ms, "cpu_ms": cpu_ms,
                **{k: (after[f"total_{k}_processed"] - before[f"total_{k}_processed"]) / n
                   for k in ("reads", "commands")}}

    async def main() -> dict[str, list[dict[str, float]]]:
        for r in routers.values():
            await r.block(agent="nobody-calls-as-this", reason="so that there is a block list to re-read")
            for _ in range(10):
                await r.complete(MODEL, MESSAGES, max_tokens=64)
        out: dict[str, list[dict[str, float]]] = {k: [] for k in routers}
        for rnd in range(args.rounds):
            for name in (list(routers) if rnd % 2 == 0 else list(reversed(routers))):
                out[name].append(await seq(routers[name]))
        for r in routers.values():
            await r.aclose()
        return out

    res = asyncio.run(main())
    spread = asyncio.run(propagation(sim, url))

    def m(name: str, key: str) -> float:
        return statistics.median(x[key] for x in res[name])

    table(["shared_state, sequential", "Redis round trips/call", "Redis commands/call", "wall ms/call",
           "CPU ms/call"], [[name, m(name, "reads"), m(name, "commands"), m(name, "wall_ms"), m(name, "cpu_ms")]
                            for name in routers],
          title=f"Guards with Redis (median of {args.rounds} rounds x {n} calls; INFO stats)")
    print(f"a block set in one router stopped the agent's calls in another (its own block list, as another "
          f"process has) after {statistics.median(spread) * 1000:.0f} ms (median of {len(spread)}; longest "
          f"{max(spread) * 1000:.0f} ms; target: within a second)")


async def propagation(sim: Any, url: str, times: int = 6) -> list[float]:
    """Seconds from calling ``block()`` in one router until another router's next call is refused."""
    from xml_pipeline_llm import BlockedError

    make = [common.make_router([common.backend_entry(sim, "rg-p", **common.NOT_BINDING)], shared_state=url,
                               redis_prefix="prop") for _ in range(2)]
    setter, victim = make
    for r in make:
        await r.complete(MODEL, MESSAGES, max_tokens=8)
    out = []

    async def calls(refused_at: list[float]) -> None:
        while True:
            try:
                await victim.complete(MODEL, MESSAGES, agent_id="target", max_tokens=8)
            except BlockedError:
                refused_at.append(time.perf_counter())
                return

    for _ in range(times):
        refused_at: list[float] = []
        task = asyncio.ensure_future(calls(refused_at))
        await asyncio.sleep(0.3)
        set_at = time.perf_counter()          # from the call to block(): its write is part of the delay
        await setter.block(agent="target", reason="bench")
        await asyncio.wait_for(task, 10)
        out.append(refused_at[0] - set_at)
        await setter.unblock(agent="target")
        await asyncio.sleep(0.6)          # the victim's list is re-read: the agent may call again
    for r in make:
        await r.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=60, help="sequential calls per round")
    ap.add_argument("--only", default="memory,redis")
    args = ap.parse_args()
    common.header("bench_guards: guards configured vs none")
    if "memory" in args.only:
        memory(args)
    if "redis" in args.only:
        redis(args)


if __name__ == "__main__":
    main()
