"""Cost of token accounting per call, and exporting a million-row ledger to CSV (issue 4).

    python benchmarks/bench_usage.py                   # ~2 min on 2 cores
    python benchmarks/bench_usage.py --rows 5000000 --rounds 10
    python benchmarks/bench_usage.py --only export     # just the CSV export

Sections (``--only``):

* ``calls``  sequential CPU and wall per ``complete()`` call with the usage
  ledger stubbed out (the "without accounting" baseline: ``record`` and the
  callback's recording are no-ops), with the default in-memory ledger, and
  with the SQLite ledger; plus a default bare ``litellm.Router`` for
  reference; and throughput at 64 in flight, memory vs SQLite ledger.  The
  three router variants share one worker process, the bare Router has its own.
* ``micro``  the accounting path alone (``UsageLedger.record``: memory, SQLite
  one commit per call, SQLite 64 in flight), in microseconds per event: the
  end-to-end figures above cannot resolve a cost this small on a noisy machine.
* ``export`` one million events written into a SQLite ledger, then timed:
  reading them back (``stores.read_events``), ``usage.write_csv(..., "event")``
  from the ledger, grouped exports via ``usage.group_events``, and the
  operator's command ``xml-pipeline-llm usage --by ... --csv``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import med, ratio, table  # noqa: E402

SECTIONS = ("calls", "micro", "export")


def micro(args: argparse.Namespace, tmp: str) -> None:
    """The accounting path alone, no LiteLLM: what recording one call costs, in microseconds."""
    import asyncio
    import gc

    from xml_pipeline_llm.stores import SqliteStore
    from xml_pipeline_llm.usage import UsageEvent, UsageLedger

    n = args.micro_events

    def events(tag: str) -> list:
        return [UsageEvent(time.time(), f"agent-{i % 50}", f"t-{i % 100}", common.MODEL, "sim-0", "openai",
                           20, 8, 28, 0.00013, 3.2, "ok", call_id=f"{tag}-{i}") for i in range(n)]

    async def one_by_one(ledger: UsageLedger, evs: list) -> None:
        for e in evs:
            await ledger.record(e)

    async def in_flight(ledger: UsageLedger, evs: list, k: int = 64) -> None:
        for i in range(0, len(evs), k):
            await asyncio.gather(*(ledger.record(e) for e in evs[i:i + k]))

    def timed(make_ledger, run, tag: str) -> tuple[float, float]:
        ledger = make_ledger()
        evs = events(tag)
        gc.collect()
        c, w = time.process_time(), time.perf_counter()
        asyncio.run(run(ledger, evs))
        if ledger.store is not None:
            ledger.store.flush()
        return (time.process_time() - c) / n * 1e6, (time.perf_counter() - w) / n * 1e6

    rows = []
    for label, make, run in [
        ("memory ledger, sequential", lambda: UsageLedger(), one_by_one),
        ("SQLite ledger, sequential (one commit each)",
         lambda: UsageLedger(SqliteStore(Path(tmp) / "micro-seq.db")), one_by_one),
        ("SQLite ledger, 64 in flight (group commits)",
         lambda: UsageLedger(SqliteStore(Path(tmp) / "micro-64.db")), in_flight),
    ]:
        results = [timed(make, run, f"{label[:6]}{r}") for r in range(3)]
        cpu = statistics.median(r[0] for r in results)
        wall = statistics.median(r[1] for r in results)
        rows.append([label, cpu, wall, f"{cpu / 1000 / args.call_cpu_ms * 100:.2f}%"])
    table(["UsageLedger.record()", "CPU us/event", "wall us/event", f"share of a {args.call_cpu_ms:g} ms call"], rows,
          title=f"The accounting path alone ({n:,} events, median of 3; CPU includes the SQLite writer thread)")
    print("ratio column: the recording's CPU as a share of one complete() call's CPU (--call-cpu-ms, from "
          "bench_overhead); the router's own part of the callback path and the UsageEvent are not included")


def calls(args: argparse.Namespace, tmp: str) -> None:
    with common.SimProcess() as sim, common.Workers(sim.url, [
        {"accounting stubbed": {"kind": "router", "stub_accounting": True, "prefix": "stub"},
         "memory ledger (default)": {"kind": "router", "prefix": "mem"},
         "SQLite ledger": {"kind": "router", "sqlite": f"{tmp}/usage.db", "prefix": "sql"}},
        {"bare Router (default)": {"kind": "bare"}},
    ]) as ws:
        names = ["accounting stubbed", "memory ledger (default)", "SQLite ledger", "bare Router (default)"]
        res = common.alternate([ws.h[n] for n in names], args.rounds, "seq", n=args.n)
        base, bare = res["accounting stubbed"], res["bare Router (default)"]
        rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
                 common.spread(res[n], base, "cpu_ms"), ratio(res[n], base, "wall_ms"), ratio(res[n], bare, "cpu_ms")]
                for n in names]
        table(["complete() with", "CPU ms/call", "wall ms/call", "CPU x stubbed", "rounds range", "wall x stubbed",
               "CPU x bare"], rows,
              title=f"Per-call cost of accounting, sequential (median of {args.rounds} rounds x {args.n} calls; "
                    f"CPU includes the SQLite writer thread)")
        mem = med(res["memory ledger (default)"], "cpu_ms") - med(base, "cpu_ms")
        sql = med(res["SQLite ledger"], "cpu_ms") - med(base, "cpu_ms")
        print(f"accounting adds {mem:+.3f} ms CPU/call in memory, {sql:+.3f} ms with SQLite end to end; the "
              f"rounds range shows the noise floor, far above these costs: see the micro section for the "
              f"accounting path alone")
        if args.tput_total:
            names = ["memory ledger (default)", "SQLite ledger"]
            res = common.alternate([ws.h[n] for n in names], 2, "tput", inflight=64, total=args.tput_total)
            rows = [[n, med(res[n], "rps"), med(res[n], "cpu_ms"), ratio(res[n], res[names[0]], "rps")]
                    for n in names]
            table(["ledger", "req/s at 64 in flight", "CPU ms/call", "req/s x memory"], rows,
                  title=f"Throughput with the SQLite ledger (group commits), {args.tput_total} calls, 2 rounds")


def make_ledger(path: Path, rows: int, chunk: int = 50_000) -> float:
    """Write ``rows`` realistic events into a new SQLite ledger; returns seconds spent."""
    from xml_pipeline_llm.stores import SqliteStore
    SqliteStore(path)                                   # creates the schema exactly as the package does
    conn = sqlite3.connect(path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(usage_events)") if r[1] != "id"]
    sql = f"INSERT INTO usage_events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    rng = random.Random(4)
    agents = [f"agent-{i:02d}" for i in range(50)]
    models = ["grok-4.1", "claude-sonnet-4", "gpt-4o", "gpt-4o-mini", "llama3"]
    backends = {"grok-4.1": ("xai-main", "xai"), "claude-sonnet-4": ("anthropic", "anthropic"),
                "gpt-4o": ("openai", "openai"), "gpt-4o-mini": ("openai", "openai"), "llama3": ("ollama", "ollama")}
    t_start = 1.75e9
    t0 = time.perf_counter()
    done = 0
    while done < rows:
        batch = []
        for k in range(done, min(rows, done + chunk)):
            model = models[k % 5]
            backend, provider = backends[model]
            p, c = rng.randint(20, 4000), rng.randint(1, 800)
            outcome = "ok" if k % 50 else ("retried:rate_limit" if k % 100 else "error:server_error")
            if outcome != "ok":
                p = c = 0
            event = {"timestamp": t_start + k * 0.6, "agent_id": agents[k % 50], "thread_id": f"t-{k % 5000}",
                     "model": model, "backend": backend, "provider": provider, "prompt_tokens": p,
                     "completion_tokens": c, "total_tokens": p + c,
                     "cost_usd": None if model == "llama3" else (p * 2.5e-6 + c * 1e-5),
                     "latency_ms": rng.uniform(200, 9000), "outcome": outcome, "call_id": f"call-{k:09d}"}
            batch.append(tuple(event.get(col) for col in cols))
        conn.executemany(sql, batch)
        conn.commit()
        done += len(batch)
    conn.close()
    return time.perf_counter() - t0


def export(args: argparse.Namespace, tmp: str) -> None:
    from xml_pipeline_llm.stores import read_events
    from xml_pipeline_llm.usage import group_events, write_csv
    db = Path(tmp) / "ledger-1m.db"
    print(f"\nwriting {args.rows:,} events into a SQLite ledger ...", flush=True)
    gen = make_ledger(db, args.rows)
    size = db.stat().st_size + sum(p.stat().st_size for p in db.parent.glob(db.name + "-*"))
    rows = [["generate + insert (setup, executemany)", gen, args.rows / gen, f"{size / 2**20:.0f} MB db", ""]]
    base_rss = common.rss_kb()

    t = time.perf_counter()
    n = sum(1 for _ in read_events(db))
    read = time.perf_counter() - t
    rows.append(["read_events() only", read, n / read, "", ""])

    out = Path(tmp) / "events.csv"
    t = time.perf_counter()
    n = write_csv(out, "event", events=read_events(db))
    ev = time.perf_counter() - t
    rows.append(["write_csv(by='event') from the ledger", ev, n / ev, f"{out.stat().st_size / 2**20:.0f} MB csv",
                 f"{n:,} rows"])

    for by in args.group_by.split(","):
        out = Path(tmp) / f"by-{by}.csv"
        t = time.perf_counter()
        n = write_csv(out, by, totals=group_events(read_events(db), by))
        g = time.perf_counter() - t
        rows.append([f"group_events + write_csv(by='{by}')", g, args.rows / g, "", f"{n:,} rows"])
    peak = common.hwm_kb()

    cli = Path(sys.executable).parent / "xml-pipeline-llm"
    if cli.exists():
        for by in ("event", "agent"):
            out = Path(tmp) / f"cli-{by}.csv"
            t = time.perf_counter()
            proc = subprocess.run([str(cli), "usage", "--store", f"sqlite:///{db}", "--by", by, "--csv", str(out)],
                                  capture_output=True, text=True)
            c = time.perf_counter() - t
            if proc.returncode == 0 and out.exists():
                lines = sum(1 for _ in out.open()) - 1
                rows.append([f"xml-pipeline-llm usage --by {by} --csv", c, args.rows / c, "", f"{lines:,} rows"])
            else:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                rows.append([f"xml-pipeline-llm usage --by {by} --csv", float("nan"), float("nan"), "failed", err])
    table(["step", "seconds", "events/s", "size", "output"], rows,
          title=f"Exporting a {args.rows:,}-row SQLite ledger to CSV")
    print(f"peak RSS of this process: {peak / 1024:.0f} MB (before the exports: {base_rss / 1024:.0f} MB; "
          f"streaming keeps it flat)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=10, help="A/B rounds for the per-call figures (default 10)")
    ap.add_argument("--n", type=int, default=30, help="calls per variant per round (default 30)")
    ap.add_argument("--tput-total", type=int, default=256, help="calls per throughput round (0: skip)")
    ap.add_argument("--micro-events", type=int, default=20_000, help="events per micro run (default 20,000)")
    ap.add_argument("--call-cpu-ms", type=float, default=9.0,
                    help="CPU ms of one complete() call, for the micro ratio (default 9.0, bench_overhead's figure)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="ledger rows to export (default 1,000,000)")
    ap.add_argument("--group-by", default="agent,thread", help="grouped exports to time (default agent,thread)")
    ap.add_argument("--tmp", help="directory for the ledger and CSV files (default: a temporary one)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    common.header("bench_usage: accounting per call, 1M-row CSV export")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xpl-usage-", dir=args.tmp) as tmp:
        if "calls" in only:
            calls(args, tmp)
        if "micro" in only:
            micro(args, tmp)
        if "export" in only:
            export(args, tmp)
    print(f"\ntotal run time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
