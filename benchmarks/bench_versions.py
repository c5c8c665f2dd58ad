"""Per-call CPU of ``complete()`` in two source trees of the package, side by side in one run.

    python benchmarks/bench_versions.py OLD_TREE [NEW_TREE] [--rounds 8] [--n 60]

Each round runs one worker process per tree (``PYTHONPATH`` set to the tree),
alternating A/B/B/A so machine noise cancels; each worker warms up, then makes
``--n`` sequential ``complete()`` calls against one simulator process and
reports the CPU seconds they took.  The ratio is the median of the per-round
ratios NEW/OLD (below 1: the new tree is cheaper).  Used to check that a
restructuring did not make the hot path dearer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import asyncio, json, os, sys, time
from xml_pipeline_llm import LLMRouter, load_config
os.environ["BENCH_KEY"] = "sk-bench"
base, n = sys.argv[1], int(sys.argv[2])
r = LLMRouter(load_config({"llm": {"backends": [{"provider": "openai", "name": "b", "base_url": base,
                                                  "api_key_env": "BENCH_KEY", "rate_limit_tpm": 10_000_000}]}}))
msgs = [{"role": "user", "content": "say hello to the benchmark please"}]
async def main():
    for _ in range(10):
        await r.complete("gpt-4o", msgs, agent_id="a", max_tokens=16)
    start = time.process_time()
    for _ in range(n):
        await r.complete("gpt-4o", msgs, agent_id="a", max_tokens=16)
    return (time.process_time() - start) / n
print(json.dumps({"cpu_ms": asyncio.run(main()) * 1000}))
"""


def run(tree: Path, base: str, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run([sys.executable, "-c", WORKER, base, str(n)], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["cpu_ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    sys.path.insert(0, str(args.new))
    from xml_pipeline_llm.simulator import run_simulator

    ratios, olds, news = [], [], []
    with run_simulator() as sim:
        base = sim.base_url("b", "openai")
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            got = {which: run(args.old if which == "old" else args.new, base, args.n) for which in order}
            olds.append(got["old"])
            news.append(got["new"])
            ratios.append(got["new"] / got["old"])
            print(f"round {i + 1}: old {got['old']:.2f} ms, new {got['new']:.2f} ms, ratio {ratios[-1]:.3f}")
    print(f"CPU per call: old {statistics.median(olds):.2f} ms, new {statistics.median(news):.2f} ms; "
          f"new/old {statistics.median(ratios):.3f} (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
