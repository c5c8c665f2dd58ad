"""A quota shared with another program: goodput and 429s with header pacing on and off, and LiteLLM's Router.

    python benchmarks/bench_quota.py                     # about a minute on 2 cores
    python benchmarks/bench_quota.py --window 6 --windows 6 --workers 16

The simulator enforces a provider quota on one backend (``tokens`` per
``--window`` seconds: a 60 s quota scaled down) and reports it in OpenAI's
headers; a "noisy neighbour" uses ``--neighbour`` of each window, spread over
it.  The same workload (``--workers`` tasks calling back to back, no limit in
the config) runs, one after another, through:

* ``pacing on``   the router, pacing the backend by the headers (the default);
* ``pacing off``  the same router with the headers ignored (429s cool the backend down);
* ``bare Router`` a ``litellm.Router`` with one deployment and its own retries and cooldowns.

Shown per variant, over the windows the load covered from start to end (the
first one left out: the router learns the quota from the first answers):
goodput (tokens served per window, i.e. per minute of the 60 s quota the
window stands for), the share of the
quota the neighbour left that was used, and 429s per 1,000 tries (every
request that reached the simulator).  Target: pacing on, at most 10 429s per
1,000 tries while using at least 90% of the quota the neighbour left.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (sets LiteLLM's offline environment first)
from common import FAKE_KEY, KEY_ENV, MESSAGES, MODEL, header, quiet_litellm, table, verdict  # noqa: E402


async def drive(call: Any, workers: int, seconds: float) -> int:
    """Call back to back from ``workers`` tasks for ``seconds``; the calls that failed."""
    stop = time.monotonic() + seconds
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while time.monotonic() < stop:
            try:
                await call()
            except Exception:
                failed += 1
                await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failed


def measure(stats: Any, skip: int, upto: int, window: float) -> dict[str, float]:
    windows = stats.done[skip:upto]
    tries = sum(w.requests + w.limited for w in windows)
    limited = sum(w.limited for w in windows)
    served = sum(w.tokens for w in windows)
    left = sum(stats.tokens - w.neighbour_tokens for w in windows)
    return {"goodput": served / len(windows),      # tokens per window: per minute of the unscaled quota
            "used": served / left if left else float("nan"),
            "per_1000": 1000 * limited / tries if tries else float("nan"),
            "tries": tries}


async def run(sim: Any, variant: str, args: argparse.Namespace) -> dict[str, float]:
    from xml_pipeline_llm import LLMRouter, load_config
    from xml_pipeline_llm.reservation import prompt_tokens

    name = f"quota-{variant.replace(' ', '-')}"
    sim.set_latency(name, args.latency)
    kwargs = {"max_tokens": 16}
    if variant == "bare Router":
        litellm = quiet_litellm()
        router = litellm.Router(model_list=[{"model_name": "m", "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": sim.base_url(name), "api_key": FAKE_KEY}}])

        async def call() -> Any:
            return await router.acompletion(model="m", messages=MESSAGES, **kwargs)
    else:
        ours = LLMRouter(load_config({"llm": {
            "retries": 0, "retry_base_delay": 0.05, "retry_max_delay": args.window,
            "backends": [{"provider": "openai", "name": name, "base_url": sim.base_url(name),
                          "api_key_env": KEY_ENV, "max_concurrent": args.workers}]}}))
        if variant == "pacing off":
            ours.health.pacer.gates = {}          # the headers are not read
        prompt_tokens(MODEL, MESSAGES)

        async def call() -> Any:
            return await ours.complete(MODEL, MESSAGES, **kwargs)
    await call()                                 # connections and imports ready before the quota starts
    sim.set_quota(name, tokens=args.tokens, requests=10**6, window=args.window, neighbour=args.neighbour)
    await drive(call, args.workers, args.windows * args.window + 0.2)
    return measure(sim.quota_stats(name), 1, args.windows, args.window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=float, default=3.0, help="seconds of one quota window (a 60 s one scaled)")
    p.add_argument("--windows", type=int, default=5, help="windows per variant (the first is not measured)")
    p.add_argument("--tokens", type=int, default=3000, help="the quota's tokens per window")
    p.add_argument("--neighbour", type=float, default=0.3, help="the share of each window the neighbour uses")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.1, help="seconds the simulator takes per answer")
    args = p.parse_args()
    header("bench_quota: a provider quota shared with a noisy neighbour")
    print(f"quota {args.tokens:,} tokens per {args.window:g} s window, the neighbour uses {args.neighbour:.0%}; "
          f"{args.workers} callers, {args.latency:g} s per answer; {args.windows - 1} windows measured", flush=True)
    from xml_pipeline_llm.simulator import run_simulator

    rows = []
    results: dict[str, dict[str, float]] = {}
    with run_simulator() as sim:
        for variant in ("pacing on", "pacing off", "bare Router"):
            r = results[variant] = asyncio.run(run(sim, variant, args))
            rows.append([variant, r["goodput"], r["used"] * 100, r["per_1000"], int(r["tries"])])
    table(["variant", "goodput (tokens/min)", "% of quota left used", "429s per 1,000 tries", "tries"], rows,
          f"tokens per window of {args.window:g} s, i.e. per minute of the 60 s quota it stands for")
    on = results["pacing on"]
    ok = on["per_1000"] <= 10 and on["used"] >= 0.9
    print(f"\npacing on: {on['per_1000']:.1f} 429s per 1,000 tries (target <= 10), "
          f"{on['used']:.0%} of the quota the neighbour left used (target >= 90%): {verdict(ok)}", flush=True)


if __name__ == "__main__":
    main()
