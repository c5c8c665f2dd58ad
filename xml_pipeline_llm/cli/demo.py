"""``xml-pipeline-llm demo``: the whole router at work, offline, in a few seconds.

A local provider simulator plays three providers with their real wire formats:

* ``xai-main`` (xai) serves ``grok-*`` and answers some calls with
  429 + Retry-After or 500;
* ``anthropic-main`` (anthropic) serves ``claude-*``;
* ``openai-main`` (openai, an OpenAI-compatible gateway) serves
  ``gpt-4o-mini``, ``grok-*`` and ``claude-*`` at a lower priority.

So every model the agents ask for has two candidate backends.  A burst of
requests from four agents goes through each strategy in turn (a fresh router
each), with a live display of the requests done, the calls in flight and
queued per backend, the retries and the cooldowns.  At the end: a table per
strategy, per backend and per agent, and a usage CSV.  Last, a fallback across
models (``demo_fallback.py``): an alias whose first model's provider is down
for a while.

Nothing here is special-cased in the router: the demo uses the public
``load_config``/``LLMRouter`` API with ``base_url`` pointing at the simulator,
exactly as a user would point organism.yaml at ``xml-pipeline-llm simulate``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _litellm
from ..config import load_config
from ..errors import BackendError, ConfigError
from ..router import LLMRouter
from ..simulator import Fault, run_simulator
from ..strategies import STRATEGY_NAMES as STRATEGY_NAMES
from ..telemetry import available
from ..usage import AgentUsage, write_csv
from .complete import SIM_KEY_ENV, SIM_KEY_VALUE
from .demo_acts import report_budget, run_budget, run_cached, run_greedy, run_loop
from .demo_fallback import report_fallback, run_fallback
from .output import CLIError, cost_text, make_console, make_table, show

if TYPE_CHECKING:
    from rich.console import Console

    from ..usage import AgentUsage


@dataclass(frozen=True)
class DemoBackend:
    provider: str
    name: str
    priority: int
    max_concurrent: int
    latency: float
    models: tuple[str, ...] | None = None


BACKENDS = (
    DemoBackend("xai", "xai-main", 1, 4, 0.08),
    DemoBackend("anthropic", "anthropic-main", 1, 4, 0.12),
    DemoBackend("openai", "openai-main", 2, 4, 0.10, ("gpt-4o-mini", "grok-*", "claude-*")),
)
FAULTY = "xai-main"
FAULT_RATE = 0.2
FAULT_SEED = 7

AGENTS = (
    ("researcher", "grok-4.3"),
    ("writer", "claude-sonnet-4-5"),
    ("critic", "grok-4.3"),
    ("planner", "claude-sonnet-4-5"),
)
TASKS = (
    "collect three facts about rate limits in language model APIs",
    "draft a short paragraph on why retries need jitter",
    "review the paragraph for unclear claims and missing caveats",
    "plan the next step of the report in two bullet points",
    "compare failover with round robin for a bursty workload",
    "summarise what a Retry-After header asks a client to do",
)


def llm_block(sim: Any, strategy: str, metrics_port: int | None = None) -> dict[str, Any]:
    """The ``llm:`` block of the demo organism, pointed at the simulator (``metrics_port``: Prometheus)."""
    backends = []
    for b in BACKENDS:
        entry: dict[str, Any] = {"provider": b.provider, "name": b.name, "priority": b.priority,
                                 "max_concurrent": b.max_concurrent, "api_key_env": SIM_KEY_ENV,
                                 "base_url": sim.base_url(b.name, b.provider)}
        if b.models:
            entry["supported_models"] = list(b.models)
        backends.append(entry)
    block = {"strategy": strategy, "retries": 3, "retry_base_delay": 0.05, "retry_max_delay": 0.3,
             "timeout": 10, "pricing": PRICING, "backends": backends}
    if metrics_port is not None:
        block["telemetry"] = {"prometheus_port": metrics_port}
    return block


# LiteLLM's map prices these models on xai and anthropic only; llm.pricing gives the
# gateway (openai-main) the providers' own prices, so that every call has a cost.
PRICING = {"grok-4.3": {"input_per_mtok": 1.25, "output_per_mtok": 2.5},
           "claude-sonnet-4-5": {"input_per_mtok": 3.0, "output_per_mtok": 15.0,
                                 "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75}}


@dataclass
class BackendTotals:
    calls: int = 0
    faults: int = 0
    peak: int = 0


@dataclass
class StrategyResult:
    strategy: str
    requests: int
    seconds: float = 0.0
    done: int = 0
    errors: int = 0
    retries: int = 0
    served: dict[str, int] = field(default_factory=dict)
    agents: dict[str, AgentUsage] = field(default_factory=dict)
    backends: dict[str, BackendTotals] = field(default_factory=dict)


# ================================================================ running

def run_demo(requests: int = 60, concurrency: int = 8, strategy: str = "all",
             csv_path: str = "xml-pipeline-llm-demo-usage.csv", console: Console | None = None,
             metrics_port: int | None = None) -> int:
    """Run the demo; returns the exit status (0).  ``metrics_port``: serve Prometheus /metrics there."""
    from rich.console import Console

    console = console or Console(highlight=False)
    strategies = STRATEGY_NAMES if strategy == "all" else (strategy,)
    os.environ.setdefault(SIM_KEY_ENV, SIM_KEY_VALUE)
    started = time.perf_counter()
    console.print(f"xml-pipeline-llm demo: {requests} requests per strategy from {len(AGENTS)} agents, "
                  f"{concurrency} at a time, through {', '.join(strategies)}.")
    console.print("Offline: a local simulator plays xai, anthropic and openai; "
                  f"{FAULTY} answers {FAULT_RATE:.0%} of its calls with 429 + Retry-After or 500.")
    with run_simulator() as sim:
        with console.status("loading LiteLLM ..."):
            _litellm.load()   # seconds, once: kept out of the first strategy's timing,
            asyncio.run(_warm_up(sim))   # as are LiteLLM's first-call set-ups
        faults = [Fault.status(429, retry_after=1), Fault.status(500), Fault.status(500)]
        sim.set_fault_rate(FAULTY, FAULT_RATE, faults, seed=FAULT_SEED)
        for b in BACKENDS:
            sim.set_latency(b.name, b.latency)
        if metrics_port is not None:
            metrics_port = _serve_metrics(sim, metrics_port, console)
        results = asyncio.run(_run_all(sim, strategies, requests, concurrency, console, metrics_port))
        with console.status("fallback across models ..."):
            fallback = asyncio.run(run_fallback(sim, llm_block(sim, "failover")))
        budgets = asyncio.run(run_budget(llm_block(sim, "failover")))
        loop = asyncio.run(run_loop(llm_block(sim, "failover")))
        fair = asyncio.run(run_greedy(llm_block(sim, "failover")))
        cached = asyncio.run(run_cached(sim, llm_block(sim, "failover")))
    _report(results, console)
    report_fallback(fallback, console)
    report_budget(budgets, console)
    console.print(loop)
    console.print(fair)
    console.print(cached)
    agents = _sum_agents(results)
    path = Path(csv_path).expanduser()
    rows = write_csv(path, "agent", totals=agents)
    console.print(f"Usage CSV, one row per agent ({rows}):", soft_wrap=True)
    console.print(f"  {path.resolve()}", soft_wrap=True)
    console.print(f"Done in {time.perf_counter() - started:.1f} s. Next: `xml-pipeline-llm init` writes a "
                  f"commented organism.yaml and a .env for your keys; then `xml-pipeline-llm check`.")
    return 0


def _serve_metrics(sim: Any, port: int, console: Console) -> int:
    """Start the Prometheus endpoint the demo's routers share; the port it serves on."""
    if not available():
        raise CLIError("--metrics-port: needs OpenTelemetry; pip install 'xml-pipeline-llm[otel]'")
    try:
        router = LLMRouter(load_config({"llm": llm_block(sim, "failover", port)}))
    except ConfigError as exc:
        raise CLIError(f"--metrics-port {port}: {exc}") from None
    url = router.telemetry.metrics_url or ""
    router.close()
    console.print(f"Metrics (Prometheus, while the demo runs): {url}", soft_wrap=True)
    return int(url.rsplit(":", 1)[1].split("/")[0]) if url else port


async def _warm_up(sim: Any) -> None:
    """One call per backend through a throwaway router (before any fault is set)."""
    router = LLMRouter(load_config({"llm": llm_block(sim, "failover")}))
    try:
        for model in ("grok-4.3", "claude-sonnet-4-5", "gpt-4o-mini"):
            await router.complete(model, [{"role": "user", "content": "warm up"}], max_tokens=4)
    finally:
        await router.aclose()


async def _run_all(sim: Any, strategies: tuple[str, ...], requests: int, concurrency: int,
                   console: Console, metrics_port: int | None = None) -> list[StrategyResult]:
    results = [StrategyResult(s, requests) for s in strategies]
    display = _Display(results, console) if console.is_terminal else None
    try:
        if display is not None:
            display.start()
        for result in results:
            await _run_strategy(sim, result, concurrency, display, metrics_port)
            if display is None:
                console.print(_summary_line(result))
    finally:
        if display is not None:
            display.stop()
    return results


async def _run_strategy(sim: Any, result: StrategyResult, concurrency: int,
                        display: _Display | None, metrics_port: int | None = None) -> None:
    router = LLMRouter(load_config({"llm": llm_block(sim, result.strategy, metrics_port)}))
    names = [b.name for b in BACKENDS]
    sim.reset_stats()
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        agent, model = AGENTS[i % len(AGENTS)]
        task = TASKS[(i // len(AGENTS)) % len(TASKS)]
        messages = [{"role": "system", "content": f"You are the {agent} of a small writing team."},
                    {"role": "user", "content": f"Task {i + 1}: {task}."}]
        async with slots:
            try:
                await router.complete(model, messages, agent_id=agent,
                                      thread_id=f"{result.strategy}-{i // len(AGENTS) + 1}", max_tokens=64)
            except BackendError:
                result.errors += 1
            finally:
                result.done += 1

    async def watch() -> None:
        while True:
            result.retries = max(0, sum(sim.stats(n).faulted for n in names) - result.errors)
            if display is not None:
                display.update(result, router, await router.cooldowns(), sim)
            await asyncio.sleep(0.2)

    start = time.perf_counter()
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(one(i) for i in range(result.requests)))
    finally:
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass
        result.seconds = time.perf_counter() - start
        for n in names:
            st = sim.stats(n)
            result.backends[n] = BackendTotals(st.requests, st.faulted, st.peak_in_flight)
        # every failed try is retried, except the last try of a request that failed
        result.retries = max(0, sum(t.faults for t in result.backends.values()) - result.errors)
        result.served = {n: u.request_count for n, u in router.get_all_usage("backend").items()}
        result.agents = router.get_all_usage("agent")
        if display is not None:
            display.update(result, router, {}, sim)
        await router.aclose()


def _summary_line(r: StrategyResult) -> str:
    served = ", ".join(f"{n} {r.served.get(n, 0)}" for n in (b.name for b in BACKENDS))
    return (f"{r.strategy}: {r.done} requests in {r.seconds:.1f} s, {r.errors} errors, "
            f"{r.retries} retries; served by {served}")


class _Display:
    """Live view on a terminal: a progress bar per strategy and the backends' state now."""

    def __init__(self, results: list[StrategyResult], console: Console) -> None:
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<13}"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                                 TimeElapsedColumn(), console=console)
        self.tasks = {r.strategy: self.progress.add_task(r.strategy, total=r.requests, note="", start=False)
                      for r in results}
        self.table: Any = ""
        self.live = Live(self, console=console, auto_refresh=False, transient=False)

    def __rich__(self) -> Any:
        from rich.console import Group

        return Group(self.progress, self.table)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.refresh()
        self.live.stop()

    def update(self, result: StrategyResult, router: Any, cooling: dict[str, float], sim: Any) -> None:
        from rich.text import Text

        task = self.tasks[result.strategy]
        self.progress.start_task(task)
        note = f"{result.retries} retries, {result.errors} errors"
        self.progress.update(task, completed=result.done, note=note)
        if result.done >= result.requests:
            self.progress.stop_task(task)
        table = make_table(f"Backends now ({result.strategy})")
        for name, justify in (("Backend", "left"), ("In flight", "right"), ("Queued", "right"),
                              ("Calls", "right"), ("Failed", "right"), ("State", "left")):
            table.add_column(name, justify=justify)
        for b in BACKENDS:
            gate = router.gate(b.name)
            st = sim.stats(b.name)
            left = cooling.get(b.name)
            state = Text(f"cooling down {left:.2f}s", style="yellow") if left else Text("ready", style="green")
            table.add_row(b.name, f"{gate.in_flight}/{b.max_concurrent}", str(gate.queued),
                          str(st.requests), str(st.faulted), state)
        self.table = table
        self.live.refresh()


# ================================================================ report

def _sum_agents(results: list[StrategyResult]) -> dict[str, AgentUsage]:
    out: dict[str, AgentUsage] = {}
    for r in results:
        for agent, u in r.agents.items():
            out.setdefault(agent, AgentUsage()).merge(u)
    return out


def _report(results: list[StrategyResult], console: Console) -> None:
    from rich.text import Text

    names = [b.name for b in BACKENDS]
    scope = "all strategies" if len(results) > 1 else results[0].strategy
    t = make_table("Strategies (requests served per backend)")
    t.add_column("Strategy")
    for col in ("Time", "Errors", "Retries", *names):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r.strategy, f"{r.seconds:.1f}s", str(r.errors), str(r.retries),
                  *(str(r.served.get(n, 0)) for n in names))
    console.print()
    show(console, t)

    t = make_table(f"Backends (provider calls, {scope})")
    for col, justify in (("Backend", "left"), ("Provider", "left"), ("Calls", "right"),
                         ("Failures", "right"), ("Peak in flight", "right"), ("Served", "right")):
        t.add_column(col, justify=justify)
    for b in BACKENDS:
        calls = sum(r.backends.get(b.name, BackendTotals()).calls for r in results)
        faults = sum(r.backends.get(b.name, BackendTotals()).faults for r in results)
        peak = max((r.backends.get(b.name, BackendTotals()).peak for r in results), default=0)
        served = sum(r.served.get(b.name, 0) for r in results)
        t.add_row(b.name, b.provider, str(calls), Text(str(faults), style="yellow" if faults else ""),
                  f"{peak} (limit {b.max_concurrent})", str(served))
    console.print()
    show(console, t)

    agents = _sum_agents(results)
    models = dict(AGENTS)
    total = AgentUsage()
    for u in agents.values():
        total.merge(u)
    t = make_table(f"Agents (usage, {scope})", footer=True)
    for col, justify, foot in (("Agent", "left", "total"), ("Model", "left", ""),
                               ("Requests", "right", str(total.request_count)),
                               ("Errors", "right", str(total.error_count)),
                               ("Tokens", "right", f"{total.total_tokens:,}"),
                               ("Cost USD", "right", cost_text(total.cost_usd))):
        t.add_column(col, justify=justify, footer=foot)
    for agent in sorted(agents):
        u = agents[agent]
        t.add_row(agent, models.get(agent, ""), str(u.request_count), str(u.error_count),
                  f"{u.total_tokens:,}", cost_text(u.cost_usd))
    console.print()
    show(console, t)
    console.print(Text("Cost: LiteLLM's price map, plus llm.pricing for the gateway's models; \"-\" where "
                       "a model has no price.", style="dim"))


def cmd_demo(args: argparse.Namespace) -> int:
    target = Path(args.csv).expanduser()
    if target.is_dir():
        raise CLIError(f"--csv {args.csv}: is a directory; name the CSV file to write")
    if not os.access(target.parent if str(target.parent) else ".", os.W_OK):
        raise CLIError(f"--csv {args.csv}: cannot write in {target.parent.resolve()}; "
                       f"choose another path with --csv")
    return run_demo(requests=args.requests, concurrency=args.concurrency, strategy=args.strategy,
                    csv_path=args.csv, console=make_console(), metrics_port=args.metrics_port)
