"""Profile sequential ``complete()`` calls and a default bare LiteLLM Router side by side (issue 6).

    python benchmarks/profile_complete.py              # 500 calls each, ~1 min
    python benchmarks/profile_complete.py --n 2000 --keep /tmp/prof

cProfile in each worker process, LiteLLM's executor threads included
(LiteLLM runs the synchronous ``completion()`` of every ``acompletion`` in the
event loop's default executor).  Prints, per call: where the CPU goes by
component, named LiteLLM features (logging payload, cost calculation, callback
path, provider inference, ...), the package's own hot spots with file:line,
and the LiteLLM functions with the most self time.  Times are inflated by the
profiler (compare columns, not with bench_overhead's figures).  The profiler
clock is each thread's CPU time, so waits for the GIL or for the machine's
other processes do not count.
"""

from __future__ import annotations

import argparse
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table  # noqa: E402

IDLE = {("~", 0, "<method 'poll' of 'select.epoll' objects>")}

# (label, path fragment, function name or None for any)
FEATURES = [
    ("Router.acompletion, whole call (router_rust)", "litellm/router_rust/core.py", "acompletion"),
    ("  litellm.acompletion", "litellm/main.py", "acompletion"),
    ("  completion() in executor thread", "litellm/main.py", "completion"),
    ("  function_setup (per-call setup)", "litellm/utils.py", "function_setup"),
    ("  Logging object __init__", "litellm/litellm_core_utils/litellm_logging.py", "__init__"),
    ("  OpenAI SDK request + parse", "openai/_base_client.py", "request"),
    ("  response -> ModelResponse", "convert_dict_to_response.py", "convert_to_model_response_object"),
    ("  cost: response_cost_calculator", "litellm/litellm_core_utils/litellm_logging.py", "response_cost_calculator"),
    ("  cost: completion_cost", "litellm/cost_calculator.py", "completion_cost"),
    ("  async success handler (callbacks)", "litellm/litellm_core_utils/litellm_logging.py", "async_success_handler"),
    ("  sync success handler (thread)", "litellm/litellm_core_utils/litellm_logging.py", "success_handler"),
    ("  standard logging payload build", "litellm/litellm_core_utils/litellm_logging.py",
     "get_standard_logging_object_payload"),
    ("  provider inference get_llm_provider", "get_llm_provider_logic.py", "get_llm_provider"),
    ("  exceptions constructed (LiteLLM)", "litellm/exceptions.py", "__init__"),
    ("  router health: repin_after_success", "litellm/router_rust/surface/health.py", "repin_after_success"),
    ("  router cooldown lookups", "router_cooldowns", "active"),
    ("  cold storage", "cold_storage", None),
    ("  token_counter (package's TPM reservation)", "litellm/litellm_core_utils/token_counter.py", "token_counter"),
    ("  package's UsageCallback", "xml_pipeline_llm/_litellm/load.py", "async_log_success_event"),
]

GROUPS = [
    ("package (xml_pipeline_llm)", "xml_pipeline_llm/"),
    ("tenacity (package's retry loop)", "tenacity/"),
    ("tiktoken", "tiktoken"),
    ("LiteLLM Router (router_rust)", "litellm/router_rust/"),
    ("LiteLLM logging", "litellm/litellm_core_utils/litellm_logging.py"),
    ("LiteLLM cost calculation", "cost_calc"),
    ("LiteLLM other", "litellm/"),
    ("OpenAI SDK", "openai/"),
    ("httpx", "httpx/"),
    ("aiohttp/yarl/multidict", "aiohttp/"),
    ("pydantic", "pydantic"),
    ("asyncio/threads/stdlib", "/lib/python3"),
    ("C builtins (attributed to no package)", "~"),
]


def short(key: tuple) -> str:
    path, line, name = key
    if path == "~":
        return name
    for marker in ("site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line} {name}"


def group_of(path: str) -> str:
    if path.startswith("~"):
        return GROUPS[-1][0]
    if "cost_calc" in path or path.endswith("cost_calculator.py"):
        return "LiteLLM cost calculation"
    for label, frag in GROUPS:
        if frag in path:
            return label
    return "other"


def feature(st: dict, frag: str, name: str | None, n: int) -> tuple[float, float]:
    """Cumulative ms and calls per call: the outermost matching function, or the sum when ``name`` is None."""
    hits = [(ct, nc) for (path, _line, fname), (_cc, nc, _tt, ct, _callers) in st.items()
            if frag in path and (name is None or fname == name)]
    if not hits:
        return 0.0, 0.0
    ct, nc = (tuple(map(sum, zip(*hits))) if name is None else max(hits))
    return ct / n * 1000, nc / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="sequential calls profiled per variant (default 500)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds the calls are split into")
    ap.add_argument("--top", type=int, default=20, help="rows in the top lists")
    ap.add_argument("--keep", help="directory to keep the .prof files in (default: a temporary one)")
    args = ap.parse_args()
    common.header(f"profile_complete: cProfile of {args.n} sequential calls")
    tmp = tempfile.TemporaryDirectory(prefix="xpl-prof-")
    out = Path(args.keep or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    names = {"complete()": {"kind": "router"}, "bare Router": {"kind": "bare"}}
    files = {"complete()": "complete.prof", "bare Router": "bare_router.prof"}
    with common.SimProcess() as sim, common.Workers(sim.url, [{k: v} for k, v in names.items()]) as ws:
        res: dict[str, list] = {k: [] for k in names}
        for r in range(args.rounds):
            for k in (list(names) if r % 2 == 0 else list(reversed(names))):
                res[k].append(ws.h[k].call("profile", n=args.n // args.rounds, out=str(out / files[k]),
                                           append=r > 0))
        runs = {k: {f: common.med(res[k], f) for f in ("cpu_ms", "main_thread_ms", "executor_submits")}
                for k in names}
    stats = {k: pstats.Stats(str(out / files[k])).stats for k in names}
    n = args.n // args.rounds * args.rounds
    a, b = stats["complete()"], stats["bare Router"]

    table(["variant", "CPU ms/call (profiled)", "main thread ms", "executor submits/call"],
          [[k, r["cpu_ms"], r["main_thread_ms"], r["executor_submits"] / (n // args.rounds)]
           for k, r in runs.items()],
          title="Profiled run")

    def by_group(st: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, (_cc, _nc, tt, _ct, _callers) in st.items():
            if key in IDLE:
                continue
            g = group_of(key[0])
            out[g] = out.get(g, 0.0) + tt / n * 1000
        return out
    ga, gb = by_group(a), by_group(b)
    rows = [[g, ga.get(g, 0.0), gb.get(g, 0.0), ga.get(g, 0.0) - gb.get(g, 0.0)]
            for g in [x for x, _ in GROUPS] + ["other"] if ga.get(g) or gb.get(g)]
    total_a, total_b = sum(ga.values()), sum(gb.values())
    rows.append(["total (idle epoll excluded)", total_a, total_b, total_a - total_b])
    table(["component (self time)", "complete() ms/call", "bare ms/call", "difference"], rows,
          title="Where the CPU goes, by component (self time per call)")

    rows = []
    for label, frag, name in FEATURES:
        ca, na = feature(a, frag, name, n)
        cb, nb = feature(b, frag, name, n)
        rows.append([label, ca, na, cb, nb])
    table(["LiteLLM feature (cumulative)", "complete() ms", "calls", "bare ms", "calls"], rows,
          title="Named LiteLLM paths per call (cumulative: callers include callees; "
                "'calls' counts coroutine resumes too)")

    ours = sorted(((k, v) for k, v in a.items() if "xml_pipeline_llm/" in k[0]
                   and k[2] not in ("complete", "_try", "_open_stream")), key=lambda kv: -kv[1][3])
    table(["package function (file:line)", "cum ms/call", "self ms/call", "calls/call"],
          [[short(k), v[3] / n * 1000, v[2] / n * 1000, v[1] / n] for k, v in ours[:args.top]],
          title="The package's own hot spots (complete() and _try excluded: they contain the LiteLLM call)")
    own = sum(v[2] for k, v in a.items() if "xml_pipeline_llm/" in k[0] or "tenacity/" in k[0]) / n * 1000
    print(f"package + tenacity self time: {own:.3f} ms/call (profiled)")

    lit = sorted(((k, v) for k, v in a.items() if "litellm/" in k[0]), key=lambda kv: -kv[1][2])
    table(["LiteLLM function (file:line)", "self ms/call", "cum ms/call", "calls/call"],
          [[short(k), v[2] / n * 1000, v[3] / n * 1000, v[1] / n] for k, v in lit[:args.top]],
          title="LiteLLM functions with the most self time, in complete()")
    if args.keep:
        print(f"\nprofiles kept in {out} (open with: python -m pstats {out}/complete.prof)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
