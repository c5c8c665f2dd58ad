"""Per-call cost of budgets (issue 13): three budgets applying to every call vs none.

    python benchmarks/bench_budgets.py                 # ~1 min on 2 cores
    python benchmarks/bench_budgets.py --rounds 12 --n 100

Both routers run in one worker process against the simulator in its own
process; rounds alternate; the figure is the median of per-round CPU ratios.
The three budgets (agent, thread and global, in tokens, far from binding)
each reserve the worst case before the call and settle after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import med, ratio, table  # noqa: E402

THREE = [{"scope": "agent", "max_tokens": 10**12, "window": "1d"},
         {"scope": "thread", "max_tokens": 10**12},
         {"scope": "global", "max_tokens": 10**13, "window": "30d"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=60, help="sequential calls per round")
    args = ap.parse_args()
    with common.SimProcess() as sim, common.Workers(sim.url, [
        {"no budgets": {"kind": "router", "prefix": "nob"},
         "three budgets": {"kind": "router", "prefix": "bud", "budgets": THREE}},
    ]) as ws:
        names = ["no budgets", "three budgets"]
        res = common.alternate([ws.h[n] for n in names], args.rounds, "seq", n=args.n)
        base = res["no budgets"]
        rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
                 common.spread(res[n], base, "cpu_ms")] for n in names]
        table(["complete() with", "CPU ms/call", "wall ms/call", "CPU x none", "rounds range"], rows,
              title=f"Budgets, sequential (median of {args.rounds} rounds x {args.n} calls)")
        r = ratio(res["three budgets"], base, "cpu_ms")
        print(f"three budgets per call: {r:.3f}x the CPU of none (target <= 1.05x: {'PASS' if r <= 1.05 else 'FAIL'})")


if __name__ == "__main__":
    main()
