"""Start-up costs (issue 6 item 4): import, ``--help``, time to the first completed call.

    python benchmarks/bench_startup.py                 # ~1 min on 2 cores
    python benchmarks/bench_startup.py --n 21 --n-call 7

Every figure is a fresh interpreter (median of N).  ``import xml_pipeline_llm``
is timed inside the process (the target: under 100 ms) and as the whole
process; ``xml-pipeline-llm --help`` is the console script in the venv's bin
(the target: under 300 ms), falling back to ``python -m xml_pipeline_llm.cli``;
the first call is a new process that imports the package, builds a router
against the simulator and completes one call, against the same with a bare
``litellm.Router``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table, verdict  # noqa: E402

PY = sys.executable
IMPORT_PKG = ("import time, sys; t = time.perf_counter(); import xml_pipeline_llm; "
              "print(time.perf_counter() - t, 'litellm' in sys.modules, 'pydantic' in sys.modules)")
IMPORT_LITELLM = "import time; t = time.perf_counter(); import litellm; print(time.perf_counter() - t)"

FIRST_CALL = r"""
import asyncio, json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, os.environ["BENCH_DIR"])
import common
url = os.environ["BENCH_SIM"] + "/b/first/v1"
out = {}
if os.environ["BENCH_KIND"] == "router":
    import xml_pipeline_llm
    out["import_pkg"] = time.perf_counter() - t0
    from xml_pipeline_llm import LLMRouter, load_config
    router = LLMRouter(load_config({"llm": {"backends": [{"provider": "openai", "name": "first", "base_url": url,
                                                           "api_key_env": common.KEY_ENV}]}}))
    out["config"] = time.perf_counter() - t0 - out["import_pkg"]
    async def call():
        return await router.complete(common.MODEL, common.MESSAGES, agent_id="a", **common.CALL_KW)
else:
    import litellm
    out["import_litellm"] = time.perf_counter() - t0
    r = common.bare_router(url)
    async def call():
        return await r.acompletion(model="m", messages=common.MESSAGES, **common.CALL_KW)
async def main():
    t1 = time.perf_counter()
    await call()
    out["first_call"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    await call()
    out["second_call"] = time.perf_counter() - t2
asyncio.run(main())
out["total_in_process"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.REPO))
    return time.perf_counter() - t, proc


def median_runs(cmd: list[str], n: int, env: dict[str, str] | None = None) -> tuple[list[float], list[str], int]:
    walls, outs, rc = [], [], 0
    for _ in range(n):
        wall, proc = run(cmd, env)
        walls.append(wall)
        outs.append(proc.stdout.strip())
        rc = rc or proc.returncode
    return walls, outs, rc


def cli_command() -> tuple[list[str] | None, str]:
    """The console script if it works, else ``python -m xml_pipeline_llm.cli``, else None and why."""
    script = Path(PY).parent / "xml-pipeline-llm"
    candidates = []
    if script.exists():
        candidates.append(([str(script), "--help"], str(script)))
    candidates.append(([PY, "-m", "xml_pipeline_llm.cli", "--help"], "python -m xml_pipeline_llm.cli"))
    why = "no console script"
    for cmd, label in candidates:
        _, proc = run(cmd)
        if proc.returncode == 0:
            return cmd, label
        why = f"{label} --help exits {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return None, why


def import_profile(cmd: list[str], top: int = 8) -> list[tuple[str, float]]:
    """The modules with the largest cumulative import time (``-X importtime``)."""
    _, proc = run([PY, "-X", "importtime", *cmd])
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        try:
            rows.append((parts[2].rstrip(), int(parts[1]) / 1000))
        except (ValueError, IndexError):
            continue
    # one level below the top: what the command's top-level import spent its time on
    depth = lambda name: len(name) - len(name.lstrip())  # noqa: E731
    levels = sorted({depth(n) for n, _ in rows})
    level = levels[1] if len(levels) > 1 else (levels[0] if levels else 0)
    tops = [(n.strip(), ms) for n, ms in rows if depth(n) == level]
    return sorted(tops, key=lambda x: -x[1])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=9, help="runs for import and --help (default 9)")
    ap.add_argument("--n-call", type=int, default=3, help="runs for the first call (default 3; ~8 s each)")
    args = ap.parse_args()
    common.header("bench_startup: import, --help, first call (fresh processes)")
    rows = []

    base, _, _ = median_runs([PY, "-c", "pass"], args.n)
    rows.append(["python -c pass (interpreter start)", statistics.median(base) * 1000, min(base) * 1000, "", ""])

    walls, outs, rc = median_runs([PY, "-c", IMPORT_PKG], args.n)
    inproc = [float(o.split()[0]) for o in outs if o and o.split()[0].replace(".", "", 1).isdigit()]
    pulled = outs[0].split()[1:] if outs and outs[0] else []
    imp = statistics.median(inproc) * 1000 if inproc else float("nan")
    rows.append(["import xml_pipeline_llm (in process)", imp, min(inproc) * 1000 if inproc else float("nan"),
                 "< 100", verdict(imp < 100)])
    rows.append(["  whole process", statistics.median(walls) * 1000, min(walls) * 1000, "", ""])

    cmd, label = cli_command()
    help_ms = float("nan")
    if cmd is not None:
        walls, _, rc = median_runs(cmd, args.n)
        help_ms = statistics.median(walls) * 1000
        rows.append([f"{Path(label).name} --help (whole process)", help_ms, min(walls) * 1000, "< 300",
                     verdict(help_ms < 300)])
    else:
        rows.append(["xml-pipeline-llm --help", float("nan"), float("nan"), "< 300", "n/a"])

    n_lit = max(1, args.n_call)
    walls, outs, _ = median_runs([PY, "-c", IMPORT_LITELLM], n_lit, env={**os.environ, **common.OFFLINE})
    lit = [float(o) for o in outs if o.replace(".", "", 1).isdigit()]
    rows.append(["import litellm (in process, offline env)",
                 statistics.median(lit) * 1000 if lit else float("nan"),
                 min(lit) * 1000 if lit else float("nan"), "", ""])
    table(["what", "median ms", "min ms", "target ms", ""], rows,
          title=f"Start-up (median of {args.n} fresh processes)")
    if pulled:
        print(f"after import xml_pipeline_llm: litellm imported={pulled[0]}, pydantic imported={pulled[1]}")
    if cmd is None:
        print(f"--help not measured: {label}")
    slow = import_profile(["-c", "import xml_pipeline_llm"])
    if slow:
        print("largest imports under `import xml_pipeline_llm` (-X importtime, cumulative ms): "
              + ", ".join(f"{n} {ms:.1f}" for n, ms in slow[:6]))
    if cmd is not None and help_ms >= 300:
        slow = import_profile(cmd[1:] if cmd[0] == PY else ["-m", "xml_pipeline_llm.cli", "--help"])
        print("largest imports under --help (cumulative ms): " + ", ".join(f"{n} {ms:.1f}" for n, ms in slow[:6]))

    with common.SimProcess() as sim:
        env = {**os.environ, **common.OFFLINE, "BENCH_DIR": str(common.HERE), "BENCH_SIM": sim.url}
        res: dict[str, list[dict]] = {"router": [], "bare": []}
        walls_by: dict[str, list[float]] = {"router": [], "bare": []}
        for r in range(args.n_call):
            for kind in (["router", "bare"] if r % 2 == 0 else ["bare", "router"]):
                wall, proc = run([PY, "-c", FIRST_CALL], {**env, "BENCH_KIND": kind})
                if proc.returncode != 0:
                    print(f"first call ({kind}) failed: {proc.stderr.strip()[-400:]}")
                    continue
                res[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                walls_by[kind].append(wall)
    rows = []
    for kind, label in (("router", "package: import + router + complete()"),
                        ("bare", "bare: import litellm + Router + acompletion")):
        if not res[kind]:
            continue
        m = {k: statistics.median(d[k] for d in res[kind]) * 1000 for k in res[kind][0]}
        first_import = m.get("import_pkg", m.get("import_litellm", float("nan")))
        rows.append([label, statistics.median(walls_by[kind]) * 1000, first_import, m.get("config", float("nan")),
                     m["first_call"], m["second_call"]])
    table(["new process", "spawn->exit ms", "import ms", "config ms", "first call ms", "second call ms"], rows,
          title=f"Time to first completed call (median of {args.n_call}; the package's first call includes "
                f"importing LiteLLM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
