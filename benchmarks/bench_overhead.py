"""Per-call overhead of ``complete()`` against a bare LiteLLM Router and a raw HTTP POST (issue 6).

    python benchmarks/bench_overhead.py                 # everything, ~3.5 min on 2 cores
    python benchmarks/bench_overhead.py --only seq,tput --rounds 10 --n 100

Sections (``--only``):

* ``seq``   sequential CPU ms and wall ms per call: ``complete()`` (accounting
  on, ``rate_limit_tpm``/``max_concurrent`` configured but not binding) vs
  LiteLLM called exactly as the package calls it (no Router) vs a
  default bare ``litellm.Router`` vs a raw ``httpx`` POST of the same body.
* ``tput``  requests/s at 1, 16, 64, 256 in flight: ``complete()`` vs bare Router.
* ``scale`` per-call cost with 1, 10, 100 backends; with 10, 1,000, 100,000
  distinct agents; SQLite ledger off/on; memory of the usage totals (tracemalloc).
* ``mem``   peak RSS with 1,000 requests in flight (simulator latency 0.5 s).

The simulator runs in its own process; every variant runs in a worker process
of its own kind (the bare Router's process never imports the package, so it
does not pay for the package's LiteLLM callback), and rounds alternate A/B/B/A
so machine noise cancels.  Ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import med, ratio, table, verdict  # noqa: E402

SECTIONS = ("seq", "tput", "scale", "mem")
TPUT_TOTAL = {1: 40, 16: 160, 64: 256, 256: 512}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=10, help="A/B rounds for sequential figures (default 10)")
    ap.add_argument("--n", type=int, default=30, help="calls per variant per round, sequential (default 30)")
    ap.add_argument("--scale-rounds", type=int, default=6, help="A/B rounds for the scaling figures (default 6)")
    ap.add_argument("--tput-rounds", type=int, default=2, help="A/B rounds for throughput (default 2)")
    ap.add_argument("--tput-scale", type=float, default=1.0, help="multiply the calls per throughput round")
    ap.add_argument("--inflight", default="1,16,64,256", help="concurrency levels for throughput")
    ap.add_argument("--mem-inflight", type=int, default=1000, help="requests in flight for peak RSS")
    ap.add_argument("--mem-latency", type=float, default=0.5, help="simulator latency during the RSS burst")
    ap.add_argument("--agents", default="10,1000,100000", help="distinct agent counts for scaling")
    ap.add_argument("--backends", default="1,10,100", help="backend counts for scaling")
    args = ap.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")

    common.header("bench_overhead: complete() vs bare litellm.Router vs raw httpx")
    print(f"settings: rounds={args.rounds} n={args.n} tput-rounds={args.tput_rounds} "
          f"model={common.MODEL} max_tokens={common.CALL_KW['max_tokens']}", flush=True)
    t_start = time.perf_counter()
    agents = [int(x) for x in args.agents.split(",")]
    backends = [int(x) for x in args.backends.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="xpl-bench-")

    with common.SimProcess() as sim:
        groups: list[dict[str, dict]] = []
        if only & {"seq", "tput", "mem"}:
            # the package's two variants share a process (both carry its LiteLLM callback); the
            # default bare Router's process never imports the package (the raw POST shares it)
            ours: dict[str, dict] = {"complete()": {"kind": "router"}}
            bare: dict[str, dict] = {"bare Router (default)": {"kind": "bare"}}
            if "seq" in only:
                ours["package's LiteLLM calls"] = {"kind": "bare_ours"}
                bare["litellm.acompletion (no Router)"] = {"kind": "acompletion"}
                bare["raw httpx POST"] = {"kind": "httpx", "warmup": 20}
            groups += [ours, bare]
        if "scale" in only:
            groups.append({f"{b} backend{'s' if b > 1 else ''}, round-robin":
                           {"kind": "router", "backends": b, "strategy": "round-robin", "prefix": f"rr{b}"}
                           for b in backends}
                          | {f"{backends[-1]} backends, failover":
                             {"kind": "router", "backends": backends[-1], "strategy": "failover",
                              "prefix": f"fo{backends[-1]}", "warmup": 30}})
            groups.append({f"{a:,} agents": {"kind": "router", "agents": a} for a in agents}
                          | {f"{agents[0]:,} agents, SQLite ledger":
                             {"kind": "router", "agents": agents[0], "sqlite": f"{tmp.name}/usage.db"}})
        t0 = time.perf_counter()
        with common.Workers(sim.url, groups) as ws:
            print(f"workers ready in {time.perf_counter() - t0:.1f}s "
                  f"(each imports LiteLLM; setup and warm-up not measured)", flush=True)
            h = ws.h
            if "seq" in only:
                sequential(h, args)
            if "tput" in only:
                throughput(h, args)
            if "scale" in only:
                scaling(h, args, agents, backends)
            if "mem" in only:
                memory(h, sim, args)
            sim_cpu = sim.cpu_seconds()
            served = sim.requests_served()
    if "scale" in only:
        totals_memory(agents)
    tmp.cleanup()
    print(f"\nsimulator process: {served:,} requests, {sim_cpu:.1f}s CPU "
          f"({sim_cpu / max(1, served) * 1000:.2f} ms/request, not counted above)")
    print(f"total run time {time.perf_counter() - t_start:.0f}s")
    return 0


def sequential(h: dict, args: argparse.Namespace) -> None:
    names = ["complete()", "package's LiteLLM calls", "bare Router (default)",
             "litellm.acompletion (no Router)", "raw httpx POST"]
    res = common.alternate([h[n] for n in names], args.rounds, "seq", n=args.n)
    bare, raw = res["bare Router (default)"], res["raw httpx POST"]
    rows = []
    for n in names:
        rows.append([n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], bare, "cpu_ms"),
                     common.spread(res[n], bare, "cpu_ms"), ratio(res[n], raw, "cpu_ms"),
                     ratio(res[n], bare, "wall_ms"), med(res[n], "other_threads_ms")])
    table(["variant", "CPU ms/call", "wall ms/call", "CPU x bare", "rounds range", "CPU x httpx", "wall x bare",
           "other threads ms"], rows,
          title=f"1. Sequential per-call cost (median of {args.rounds} rounds x {args.n} calls)")
    r = ratio(res["complete()"], bare, "cpu_ms")
    own = med(res["complete()"], "cpu_ms") - med(res["package's LiteLLM calls"], "cpu_ms")
    setup = med(res["package's LiteLLM calls"], "cpu_ms") - med(bare, "cpu_ms")
    print(f"target: complete() CPU <= 1.05x default bare Router: {r:.3f}x  {verdict(r <= 1.05)}")
    print(f"  split: package's own Python {own:+.2f} ms/call; package's LiteLLM calls "
          f"(acompletion on the deployment, callback, metadata) vs bare Router {setup:+.2f} ms/call; "
          f"LiteLLM over raw httpx {med(bare, 'cpu_ms') - med(raw, 'cpu_ms'):+.2f} ms/call")


def throughput(h: dict, args: argparse.Namespace) -> None:
    names = ["complete()", "bare Router (default)"]
    rows = []
    at64 = None
    for k in [int(x) for x in args.inflight.split(",")]:
        total = int(TPUT_TOTAL.get(k, max(4 * k, 100)) * args.tput_scale)
        res = common.alternate([h[n] for n in names], args.tput_rounds, "tput", inflight=k, total=total)
        a, b = res["complete()"], res["bare Router (default)"]
        rr = ratio(a, b, "rps")
        if k == 64:
            at64 = rr
        rows.append([k, total, med(a, "rps"), med(b, "rps"), rr, med(a, "cpu_ms"), med(b, "cpu_ms")])
    table(["in flight", "calls", "complete() req/s", "bare req/s", "ratio", "complete() CPU ms",
           "bare CPU ms"], rows, title=f"2. Throughput (median of {args.tput_rounds} rounds)")
    if at64 is not None:
        print(f"target: throughput at 64 in flight >= 0.95x bare Router: {at64:.3f}x  {verdict(at64 >= 0.95)}")


def scaling(h: dict, args: argparse.Namespace, agents: list[int], backends: list[int]) -> None:
    bnames = [n for n in h if "backend" in n]
    res = common.alternate([h[n] for n in bnames], args.scale_rounds, "seq", n=args.n)
    base = res[bnames[0]]
    rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
             common.spread(res[n], base, "cpu_ms")] for n in bnames]
    table(["backends serving the model", "CPU ms/call", "wall ms/call", "CPU x 1 backend", "rounds range"], rows,
          title="3a. Scaling with backends")
    worst = max(ratio(res[n], base, "cpu_ms") for n in bnames)
    print(f"target: flat within 10% from 1 to {backends[-1]} backends: worst {worst:.3f}x  {verdict(worst <= 1.10)}")

    anames = [n for n in h if n.endswith(" agents")]
    sq = [n for n in h if "SQLite" in n]
    res = common.alternate([h[n] for n in anames + sq], args.scale_rounds, "seq", n=args.n)
    base = res[anames[0]]
    rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
             common.spread(res[n], base, "cpu_ms"), med(res[n], "gc_ms")] for n in anames]
    table(["distinct agent_ids", "CPU ms/call", "wall ms/call", f"CPU x {agents[0]} agents", "rounds range",
           "GC ms/call"], rows,
          title="3b. Scaling with agents (totals pre-filled with one event per agent)")
    worst = max(ratio(res[n], base, "cpu_ms") for n in anames)
    print(f"target: flat within 10% from {agents[0]:,} to {agents[-1]:,} agents: worst {worst:.3f}x  "
          f"{verdict(worst <= 1.10)}")
    if sq:
        rows = [["memory ledger (default)", med(base, "cpu_ms"), med(base, "wall_ms"), 1.0, "", 1.0],
                ["SQLite ledger", med(res[sq[0]], "cpu_ms"), med(res[sq[0]], "wall_ms"),
                 ratio(res[sq[0]], base, "cpu_ms"), common.spread(res[sq[0]], base, "cpu_ms"),
                 ratio(res[sq[0]], base, "wall_ms")]]
        table(["usage store", "CPU ms/call", "wall ms/call", "CPU ratio", "rounds range", "wall ratio"], rows,
              title="3c. SQLite ledger off/on (CPU includes the writer thread)")


def totals_memory(agents: list[int]) -> None:
    """Memory of the in-process usage totals, by agents and by events per agent (tracemalloc)."""
    from xml_pipeline_llm.usage import UsageEvent, UsageLedger
    rows = []
    for n in agents:
        for per_agent in (1, 5):
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            ledger = UsageLedger()
            ids = [f"agent-{i}" for i in range(n)]
            threads = [f"t-{i}" for i in range(100)]
            k = 0
            for _ in range(per_agent):
                for a in ids:
                    ledger._count(UsageEvent(1.7e9 + k, a, threads[k % 100], common.MODEL, "sim-0", "openai",
                                             20, 8, 28, 0.0001, 3.0, "ok", call_id=f"call-{k:012d}"))
                    k += 1
            full = tracemalloc.get_traced_memory()[0]
            ledger._events.clear()
            no_events = tracemalloc.get_traced_memory()[0]
            ledger._seen.clear()
            totals_only = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            del ids
            rows.append([f"{n:,}", f"{k:,}", (totals_only - before) / 2**20,
                         (totals_only - before) / n, (full - no_events) / 2**20,
                         (no_events - totals_only) / 2**20, (full - before) / 2**20])
            del ledger
    table(["agents", "events", "totals MB", "totals B/agent", "event log MB", "seen-ids MB", "ledger MB"],
          rows, title="3d. Memory of the in-process usage ledger (tracemalloc; event log keeps the newest "
                      "100,000 events, seen-ids the newest 65,536 call ids)")
    print("target: totals memory linear in agents, independent of request count "
          "(compare 'totals MB' for 1 vs 5 events per agent)")


def memory(h: dict, sim: common.SimProcess, args: argparse.Namespace) -> None:
    sim.set_latency("*", args.mem_latency)
    rows = []
    try:
        for n in ["bare Router (default)", "complete()"]:
            sim.reset_stats()
            r = h[n].call("burst", n=args.mem_inflight)
            peak = sim.total_stats()["peak_in_flight"]
            delta = r["hwm_kb"] - r["base_rss_kb"]
            rows.append([n, r["base_rss_kb"] / 1024, r["hwm_kb"] / 1024, delta / 1024,
                         delta / args.mem_inflight, peak, r["wall_s"], r["errors"]])
            if r["errors"]:
                print(f"  {n}: {r['errors']} errors, first: {r['first_error']}")
    finally:
        sim.set_latency("*", 0.0)
    table(["variant", "RSS before MB", "peak RSS MB", "delta MB", "KB/request", "sim peak in flight",
           "wall s", "errors"], rows,
          title=f"5. Peak memory with {args.mem_inflight:,} requests in flight "
                f"(simulator latency {args.mem_latency}s)")


if __name__ == "__main__":
    sys.exit(main())
