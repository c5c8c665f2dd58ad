"""Per-call CPU of telemetry (issue 14): OpenTelemetry on vs off, and off vs not installed.

    python benchmarks/bench_telemetry.py                  # ~2 min on 2 cores
    python benchmarks/bench_telemetry.py --rounds 20 --n 50

Four ``complete()`` variants, each in a worker process of its own (the
OpenTelemetry setting is process-wide): ``not installed`` (OpenTelemetry made
unimportable before the package loads), ``off`` (``llm.telemetry.otel:
false``), ``on, API only`` (installed, no SDK: the API's no-op tracer and
meter) and ``on, SDK`` (the SDK's tracer and meter providers, spans to an
exporter that drops them, metrics to a reader that drops them every 5 s).
Rounds alternate A/B/B/A; ratios are medians of per-round ratios.  Needs the
``[otel]`` extra (and ``opentelemetry-sdk``, which the exporter brings).
Target: off <= 1.01x not installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import med, ratio, table, verdict  # noqa: E402

VARIANTS = {"not installed": "missing", "off": "off", "on, API only": "api", "on, SDK (no-op exporter)": "sdk"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12, help="A/B rounds (default 12)")
    ap.add_argument("--n", type=int, default=40, help="sequential calls per variant per round (default 40)")
    args = ap.parse_args()
    common.header("bench_telemetry: complete() with OpenTelemetry not installed / off / on")
    with common.SimProcess() as sim:
        groups = [{name: {"kind": "router", "telemetry": kind}} for name, kind in VARIANTS.items()]
        with common.Workers(sim.url, groups) as w:
            res = common.alternate([w.h[n] for n in VARIANTS], args.rounds, "seq", n=args.n)
    base = res["not installed"]
    rows = [[n, med(res[n], "cpu_ms"), med(res[n], "wall_ms"), ratio(res[n], base, "cpu_ms"),
             common.spread(res[n], base, "cpu_ms"), ratio(res[n], res["off"], "cpu_ms")] for n in VARIANTS]
    table(["variant", "CPU ms/call", "wall ms/call", "CPU x not installed", "rounds range", "CPU x off"], rows,
          title=f"Per-call cost (median of {args.rounds} rounds x {args.n} sequential calls)")
    off = ratio(res["off"], base, "cpu_ms")
    on = ratio(res["on, SDK (no-op exporter)"], res["off"], "cpu_ms")
    extra = med(res["on, SDK (no-op exporter)"], "cpu_ms") - med(res["off"], "cpu_ms")
    print(f"target: off <= 1.01x not installed: {off:.3f}x  {verdict(off <= 1.01)}")
    print(f"on (SDK, no-op exporter) vs off: {on:.3f}x ({extra:+.3f} ms/call for 2 spans and 6 metric points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
