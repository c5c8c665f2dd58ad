"""Fair shares (issue 16): a light agent's wait alone vs under a greedy agent's flood, FIFO vs fair.

    python benchmarks/bench_fairness.py              # ~40 s on 2 cores
    python benchmarks/bench_fairness.py --flood 400 --light 40

One backend with ``max_concurrent: 2`` whose simulator answers after 50 ms.
A greedy agent queues ``--flood`` calls at once; a light agent then sends
``--light`` calls one after another, and its wait (call latency) is measured.
The greedy agent keeps its queue full (each call that ends is replaced).
"FIFO" is what arrival order gives: the light agent's calls are made under the
greedy agent's id, so fair queueing has nobody to be fair to.  Also the
per-call CPU when limits do not bind, with the fair order's bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table  # noqa: E402

LATENCY = 0.05


async def light_waits(router: object, light_agent: str, flood: int, light: int) -> list[float]:
    """The light agent's call latencies while ``flood`` greedy calls stay queued (each replaced when done)."""
    r: Any = router
    stop = False

    async def greedy() -> None:
        while not stop:
            await r.complete(common.MODEL, common.MESSAGES, agent_id="greedy", max_tokens=16)

    workers = [asyncio.ensure_future(greedy()) for _ in range(flood)]
    await asyncio.sleep(0.2)
    waits = []
    for _ in range(light):
        start = time.perf_counter()
        await r.complete(common.MODEL, common.MESSAGES, agent_id=light_agent, max_tokens=16)
        waits.append(time.perf_counter() - start)
    stop = True
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return waits


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def main_async(args: argparse.Namespace, sim: common.SimProcess) -> None:
    rows = []
    sim.set_latency("fair-0", LATENCY)
    for label, flood, agent in (("alone", 0, "light"), ("under flood, FIFO", args.flood, "greedy"),
                                ("under flood, fair", args.flood, "light")):
        router = common.make_router([common.backend_entry(sim, "fair-0", max_concurrent=2)])
        await router.complete(common.MODEL, common.MESSAGES, max_tokens=4)      # warm up
        waits = await light_waits(router, agent, flood, args.light)
        rows.append([label, statistics.median(waits) * 1000, pct(waits, 0.95) * 1000])
        await router.aclose()
    table(["light agent's calls", "p50 ms", "p95 ms"], rows,
          title=f"Wait of a light agent ({args.light} calls), greedy flood of {args.flood}, 2 slots, "
                f"{LATENCY * 1000:.0f} ms answers")
    fifo, fair = rows[1][1], rows[2][1]
    print(f"headline: fair shares cut the light agent's median wait under a flood {fifo / fair:.1f}x "
          f"(FIFO {fifo:.0f} ms -> fair {fair:.0f} ms; alone {rows[0][1]:.0f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood", type=int, default=100)
    ap.add_argument("--light", type=int, default=8)
    args = ap.parse_args()
    with common.SimProcess() as sim:
        asyncio.run(main_async(args, sim))


if __name__ == "__main__":
    main()
