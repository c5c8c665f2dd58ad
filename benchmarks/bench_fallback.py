"""Fallbacks across models and requests per minute (issue 15).

    python benchmarks/bench_fallback.py                      # both sections, ~3.5 min
    python benchmarks/bench_fallback.py --only alias --rounds 20
    python benchmarks/bench_fallback.py --only rpm --rpm 30 --seconds 180

Sections (``--only``):

* ``alias``  per-call CPU of ``complete("fast")`` for an alias
  ``fast: [gpt-4o, gpt-4o-mini]`` whose first model answers, against
  ``complete("gpt-4o")`` directly, on the same router, in alternating
  A/B/B/A rounds; the ratio is the median of per-round ratios.  Target <= 1.02x.
* ``rpm``    ``rate_limit_rpm`` adherence: several agents call one backend as
  fast as they can for ``--seconds``; each call's start (its usage event's
  timestamp minus its latency: the moment it was sent) is collected, and the
  busiest sliding 60 s window is compared with the limit.  Target: never above it.

The simulator runs in its own process (``common.SimProcess``); the router runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table, verdict  # noqa: E402

SECTIONS = ("alias", "rpm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=12, help="A/B rounds for the alias figure (default 12)")
    ap.add_argument("--n", type=int, default=40, help="calls per variant per round (default 40)")
    ap.add_argument("--rpm", type=int, default=30, help="rate_limit_rpm of the rpm run (default 30)")
    ap.add_argument("--seconds", type=float, default=180.0, help="length of the rpm run (default 180)")
    ap.add_argument("--agents", type=int, default=8, help="concurrent callers in the rpm run (default 8)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    common.header("bench_fallback: aliases vs direct calls; rate_limit_rpm adherence")
    ok = True
    with common.SimProcess() as sim:
        if "alias" in only:
            ok &= asyncio.run(alias_section(sim, args.rounds, args.n))
        if "rpm" in only:
            ok &= asyncio.run(rpm_section(sim, args.rpm, args.seconds, args.agents))
    return 0 if ok else 1


async def alias_section(sim: common.SimProcess, rounds: int, n: int) -> bool:
    r = common.make_router([common.backend_entry(sim, "bf-4o", supported_models=["gpt-4o"]),
                            common.backend_entry(sim, "bf-mini", supported_models=["gpt-4o-mini"])],
                           models={"fast": ["gpt-4o", "gpt-4o-mini"]})

    async def calls(model: str) -> float:
        start = time.process_time()
        for _ in range(n):
            await r.complete(model, common.MESSAGES, **common.CALL_KW)
        return (time.process_time() - start) / n * 1000

    for model in ("fast", "gpt-4o"):          # warm-up: first-call costs out of the figures
        for _ in range(10):
            await r.complete(model, common.MESSAGES, **common.CALL_KW)
    alias: list[float] = []
    direct: list[float] = []
    for i in range(rounds):
        order = ("fast", "gpt-4o") if i % 2 == 0 else ("gpt-4o", "fast")
        for model in order:
            (alias if model == "fast" else direct).append(await calls(model))
    ratios = sorted(a / d for a, d in zip(alias, direct))
    med = statistics.median(ratios)
    mini = sim.stats("bf-mini")["requests"]
    table(["figure", "measured", "target", "verdict"], [
        ["CPU ms per call, direct gpt-4o", statistics.median(direct), "", ""],
        ["CPU ms per call, alias fast (first model answers)", statistics.median(alias), "", ""],
        ["alias / direct (median of rounds)", f"{med:.3f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})", "<= 1.02x",
         verdict(med <= 1.02)],
        ["calls that reached the second model", mini, "0", verdict(mini == 0)],
    ], title=f"alias vs direct: {rounds} rounds x {n} calls each")
    await r.aclose()
    return med <= 1.02 and mini == 0


async def rpm_section(sim: common.SimProcess, rpm: int, seconds: float, agents: int) -> bool:
    name = "bf-rpm"
    r = common.make_router([common.backend_entry(sim, name, rate_limit_rpm=rpm)])
    stop = time.time() + seconds
    started = time.time()

    async def agent(i: int) -> None:
        while time.time() < stop:
            try:
                await asyncio.wait_for(r.complete(common.MODEL, common.MESSAGES, agent_id=f"a{i}",
                                                  **common.CALL_KW), max(0.1, stop - time.time()))
            except asyncio.TimeoutError:
                return

    print(f"rpm run: rate_limit_rpm={rpm}, {agents} agents, {seconds:.0f} s ...", flush=True)
    await asyncio.gather(*(agent(i) for i in range(agents)))
    starts = sorted(e.timestamp - e.latency_ms / 1000 for e in r.usage_events())
    busiest = _busiest(starts, 60.0 - 0.05)     # the start times are measured to a few ms
    expected = rpm * (int(seconds // 60) + 1)
    windows = [sum(1 for t in starts if started + k * 60 <= t < started + (k + 1) * 60)
               for k in range(int(seconds // 60) + 1)]
    served = sim.stats(name)["requests"]
    table(["figure", "measured", "target", "verdict"], [
        ["starts in the busiest sliding 60 s window", busiest, f"<= {rpm}", verdict(busiest <= rpm)],
        ["starts per minute of the run", " / ".join(str(w) for w in windows), f"{rpm} each", ""],
        ["starts in all", len(starts), f"<= {expected} (rpm per started minute)", verdict(len(starts) <= expected)],
        ["provider calls the simulator received", served, f"= {len(starts)}", verdict(served == len(starts))],
    ], title=f"rate_limit_rpm={rpm} over {seconds:.0f} s")
    await r.aclose()
    return busiest <= rpm and served == len(starts)


def _busiest(times: list[float], period: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


if __name__ == "__main__":
    sys.exit(main())
