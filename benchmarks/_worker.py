"""One benchmark variant in its own process, driven over stdin/stdout (JSON lines).

Started by ``common.Worker``; not meant to be run by hand.  ``argv[1]`` is a
JSON spec ``{"sim": <simulator root URL>, "variants": {name: variant spec}}``;
several variants of one kind may share a process.  A variant spec has:

* ``kind``: ``router`` (``LLMRouter.complete``), ``bare`` (a default bare
  ``litellm.Router``, this process never imports the package), ``bare_ours``
  (LiteLLM called exactly as the package calls it, ``_litellm.Deployments``,
  with the package's metadata: ``complete()`` minus the package's own Python),
  ``acompletion`` (``litellm.acompletion`` with no Router), or ``httpx`` (a raw POST of the same body).
* ``backends``: how many backends serve the model
  (router kinds); ``strategy``; ``agents``: distinct agent ids (the usage
  totals are pre-filled with that many agents); ``sqlite``: ledger path or
  null; ``budgets``, ``guards``: ``llm.budgets`` and ``llm.guards``; ``stub_accounting``: make
  the ledger's record a no-op (the "without accounting" baseline); ``limits``: backend limit keys; ``prefix``: backend
  names are ``<prefix>-0``, ``<prefix>-1``, ... (default ``sim``); ``warmup``: calls;
  ``telemetry`` (issue 14; per process, so one variant per worker): ``missing`` (OpenTelemetry
  made unimportable before the package loads), ``off`` (``llm.telemetry.otel: false``), ``api``
  (installed, no SDK providers: the API's no-ops) or ``sdk`` (the SDK's tracer and meter
  providers with an exporter and a reader that drop everything).

Commands: ``seq`` (n sequential calls: CPU ms and wall ms per call),
``tput`` (total calls with ``inflight`` at a time: req/s), ``burst`` (n calls
at once: peak RSS), ``profile`` (cProfile of n sequential calls to a file),
``quit``; each names its variant in ``v``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets LiteLLM's offline environment before anything imports it)


class GcTimer:
    """Time spent in the cyclic garbage collector (gc.callbacks), all generations."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t


GC = GcTimer()


class Variant:
    def __init__(self, spec: dict[str, Any], sim: str) -> None:
        self.spec = spec
        self.kind = spec["kind"]
        self.sim = sim
        self.n_backends = int(spec.get("backends", 1))
        self.names = [f"{spec.get('prefix', 'sim')}-{i}" for i in range(self.n_backends)]
        self.agents = [f"agent-{i}" for i in range(int(spec.get("agents", 10)))]
        self.router: Any = None
        self.call: Any = None

    def base_url(self, name: str) -> str:
        return f"{self.sim}/b/{name}/v1"

    async def setup(self) -> None:
        kind = self.kind
        if kind == "router":
            await self._setup_router()
        elif kind == "bare":
            r = common.bare_router(self.base_url(self.names[0]))

            async def call(i: int) -> Any:
                return await r.acompletion(model="m", messages=common.MESSAGES, **common.CALL_KW)
            self.call = call
        elif kind == "bare_ours":
            from xml_pipeline_llm import _litellm
            router = self._make_router()
            llm = _litellm.Deployments(router.backends)
            _litellm.register(router.id, router)
            self.router = router
            name = self.names[0]
            agents = self.agents

            async def call(i: int) -> Any:
                meta = {"xpl_router": router.id, "xpl_backend": name, "agent_id": agents[i % len(agents)],
                        "thread_id": None, "xpl_model": common.MODEL}
                return await llm.acompletion(name, common.MODEL, messages=common.MESSAGES,
                                             metadata=meta, **common.CALL_KW)
            self.call = call
        elif kind == "acompletion":
            litellm = common.quiet_litellm()
            base = self.base_url(self.names[0])

            async def call(i: int) -> Any:
                return await litellm.acompletion(model=f"openai/{common.MODEL}", messages=common.MESSAGES,
                                                 api_base=base, api_key=common.FAKE_KEY, **common.CALL_KW)
            self.call = call
        elif kind == "httpx":
            import httpx
            client = httpx.AsyncClient(timeout=60)
            url = self.base_url(self.names[0]) + "/chat/completions"
            headers = {"Authorization": f"Bearer {common.FAKE_KEY}"}
            body = {"model": common.MODEL, "messages": common.MESSAGES, **common.CALL_KW}

            async def call(i: int) -> Any:
                resp = await client.post(url, json=body, headers=headers)
                resp.raise_for_status()
                return resp.json()
            self.call = call
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def _make_router(self) -> Any:
        limits = self.spec.get("limits", common.NOT_BINDING)
        backends = [{"provider": "openai", "name": n, "base_url": self.base_url(n),
                     "api_key_env": common.KEY_ENV, **limits} for n in self.names]
        llm: dict[str, Any] = {"strategy": self.spec.get("strategy", "round-robin")}
        if self.spec.get("sqlite"):
            llm["usage_store"] = f"sqlite:///{self.spec['sqlite']}"
        if self.spec.get("budgets"):
            llm["budgets"] = self.spec["budgets"]
        if self.spec.get("guards"):
            llm["guards"] = self.spec["guards"]
        if self.spec.get("telemetry") == "off":
            llm["telemetry"] = {"otel": False}
        return common.make_router(backends, **llm)

    async def _setup_router(self) -> None:
        router = self.router = self._make_router()
        if self.spec.get("stub_accounting"):
            async def record(event: Any) -> None:
                return None
            router._ledger.record = record
            router._ledger.record_nowait = lambda event: None
            router._services.record_from_callback = lambda *a, **k: None   # the LiteLLM callback's share
        agents = self.agents
        threads = [f"t-{i}" for i in range(100)]

        async def call(i: int) -> Any:
            return await router.complete(common.MODEL, common.MESSAGES, agent_id=agents[i % len(agents)],
                                         thread_id=threads[i % 100], **common.CALL_KW)
        self.call = call

    def prefill(self) -> None:
        """Give the usage totals one event per agent, as if each agent had called before."""
        if self.kind != "router" or self.spec.get("stub_accounting"):
            return
        from xml_pipeline_llm.usage import UsageEvent
        ledger = self.router._ledger
        now = time.time()
        for a in self.agents:
            ledger._count(UsageEvent(now, a, "t-0", common.MODEL, self.names[0], "openai", 10, 5, 15,
                                     0.0001, 1.0, "ok"))

    async def warmup(self) -> None:
        n = int(self.spec.get("warmup", max(30, 3 * self.n_backends)))
        for i in range(n):
            await self.call(i)
        # and a few concurrent, so connection pools are filled
        await asyncio.gather(*(self.call(i) for i in range(min(n, 16))))

    # ------------------------------------------------------------ commands

    async def seq(self, n: int) -> dict[str, Any]:
        gc.collect()
        g0 = GC.total
        c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        for i in range(n):
            await self.call(i)
        w1 = time.perf_counter()
        await asyncio.sleep(0.02)       # let LiteLLM's background logging of the last call finish
        c1, t1 = time.process_time(), time.thread_time()
        return {"cpu_ms": (c1 - c0) / n * 1000, "wall_ms": (w1 - w0) / n * 1000,
                "other_threads_ms": ((c1 - c0) - (t1 - t0)) / n * 1000, "gc_ms": (GC.total - g0) / n * 1000}

    async def tput(self, inflight: int, total: int) -> dict[str, Any]:
        gc.collect()
        it = iter(range(total))

        async def worker() -> None:
            for i in it:
                await self.call(i)
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        w1 = time.perf_counter()
        c1 = time.process_time()
        return {"rps": total / (w1 - w0), "cpu_ms": (c1 - c0) / total * 1000}

    async def burst(self, n: int) -> dict[str, Any]:
        gc.collect()
        base = common.rss_kb()
        w0 = time.perf_counter()
        results = await asyncio.gather(*(self.call(i) for i in range(n)), return_exceptions=True)
        wall = time.perf_counter() - w0
        errors = [r for r in results if isinstance(r, BaseException)]
        return {"base_rss_kb": base, "hwm_kb": common.hwm_kb(), "after_rss_kb": common.rss_kb(),
                "wall_s": wall, "errors": len(errors), "first_error": repr(errors[0])[:200] if errors else ""}

    async def profile(self, n: int, out: str, msg_append: bool = False) -> dict[str, Any]:
        """cProfile of ``n`` sequential calls, the event loop's executor threads included.

        LiteLLM runs the synchronous part of every ``acompletion`` (``completion()``)
        in the loop's default executor, so a main-thread-only profile would miss
        it: the executor is replaced by one whose threads profile what they run.
        """
        import cProfile
        import pstats
        from concurrent.futures import ThreadPoolExecutor

        profilers: list[cProfile.Profile] = []

        class ProfilingExecutor(ThreadPoolExecutor):
            def submit(self, fn: Any, /, *a: Any, **k: Any) -> Any:
                prof = cProfile.Profile(time.thread_time)
                profilers.append(prof)
                return super().submit(prof.runcall, fn, *a, **k)

        loop = asyncio.get_running_loop()
        executor = ProfilingExecutor(max_workers=4)
        loop.set_default_executor(executor)
        gc.collect()
        prof = cProfile.Profile(time.thread_time)   # CPU time: waits for the GIL or the CPU do not count
        c0, t0 = time.process_time(), time.thread_time()
        prof.enable()
        for i in range(n):
            await self.call(i)
        await asyncio.sleep(0.02)
        prof.disable()
        c1, t1 = time.process_time(), time.thread_time()
        stats = pstats.Stats(prof)
        for p in profilers:
            stats.add(p)
        if Path(out).exists() and msg_append:
            stats.add(out)
        stats.dump_stats(out)
        return {"cpu_ms": (c1 - c0) / n * 1000, "main_thread_ms": (t1 - t0) / n * 1000,
                "executor_submits": len(profilers)}

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rss_kb": common.rss_kb(), "gc_tracked_objects": len(gc.get_objects())}
        if self.router is not None and self.kind == "router":
            out["agents_in_totals"] = len(self.router._ledger._totals["agent"])
            out["events_in_memory"] = len(self.router._ledger._events)
        return out


def setup_telemetry(kinds: set[str]) -> None:
    """The process-wide OpenTelemetry setting of the ``telemetry`` variants (see the module doc)."""
    if "missing" in kinds:
        for name in ("opentelemetry", "opentelemetry.trace"):
            sys.modules[name] = None  # type: ignore[assignment]   # import (and find_spec) now fail
    if "sdk" in kinds:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        class DropSpans(SpanExporter):
            def export(self, spans: Any) -> Any:
                return SpanExportResult.SUCCESS

        class DropMetrics(MetricExporter):
            def export(self, metrics_data: Any, timeout_millis: float = 0, **kw: Any) -> Any:
                from opentelemetry.sdk.metrics.export import MetricExportResult
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 0) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 0, **kw: Any) -> None:
                pass

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(DropSpans()))
        trace.set_tracer_provider(provider)
        reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=5000)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def main() -> int:
    spec = json.loads(sys.argv[1])
    setup_telemetry({v.get("telemetry") for v in spec["variants"].values()} - {None})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    variants: dict[str, Variant] = {}
    try:
        t0 = time.perf_counter()
        for name, vspec in spec["variants"].items():
            v = variants[name] = Variant(vspec, spec["sim"])
            loop.run_until_complete(v.setup())
            v.prefill()
            loop.run_until_complete(v.warmup())
        print(json.dumps({"ok": True, "ready": True, "setup_s": time.perf_counter() - t0,
                          "rss_kb": common.rss_kb()}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            v = variants[msg.pop("v")]
            if cmd == "seq":
                result = loop.run_until_complete(v.seq(int(msg["n"])))
            elif cmd == "tput":
                result = loop.run_until_complete(v.tput(int(msg["inflight"]), int(msg["total"])))
            elif cmd == "burst":
                result = loop.run_until_complete(v.burst(int(msg["n"])))
            elif cmd == "profile":
                result = loop.run_until_complete(v.profile(int(msg["n"]), msg["out"], bool(msg.get("append"))))
            elif cmd == "info":
                result = v.info()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            print(json.dumps({"ok": True, **result}), flush=True)
        except Exception as exc:
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    for v in variants.values():
        if v.router is not None:
            loop.run_until_complete(v.router.aclose())
    return 0


if __name__ == "__main__":
    sys.exit(main())
