"""OpenTelemetry spans and metrics and the Prometheus endpoint.

The SDK's in-memory span exporter and metric reader are installed as the
global providers once for the session (OpenTelemetry allows that once per
process); the span processor only keeps spans while a test of this module
runs, so the rest of the suite pays next to nothing for it.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, make_router

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from xml_pipeline_llm import ProviderError  # noqa: E402
from xml_pipeline_llm.instruments import DURATION_BUCKETS, TOKEN_BUCKETS  # noqa: E402
from xml_pipeline_llm.simulator import Fault  # noqa: E402

# A model of the tests' own: LiteLLM's cost map is one per process, so a price given here stays for the session.
PRICED = "grok-otel-priced"
PRICING = {PRICED: {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}


class Keep(SpanProcessor):
    """Hands ended spans to the in-memory exporter while ``on`` (the tests of this module)."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter
        self.on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.exporter.export([span])


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.keep = Keep(self.exporter)
        self.reader = InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(self.keep)
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def points(self, name: str, backends: set[str]) -> list[Any]:
        """The data points of metric ``name`` whose ``xpl.backend`` is one of ``backends``."""
        out = []
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out += [p for p in m.data.data_points if p.attributes.get("xpl.backend") in backends]
        return out


_OTEL: Otel | None = None


@pytest.fixture
def otel() -> Iterator[Otel]:
    global _OTEL
    if _OTEL is None:
        _OTEL = Otel()
    _OTEL.exporter.clear()
    _OTEL.keep.on = True
    yield _OTEL
    _OTEL.keep.on = False
    _OTEL.exporter.clear()


def by_name(spans: list[ReadableSpan], model: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == f"chat {model}"]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(kids, key=lambda s: s.start_time or 0)


async def test_a_request_that_fails_over_once_is_one_span_with_two_try_children(sim, otel):
    sim.script("ot-fo-a", [Fault.status(429, retry_after=0.1)])
    r = make_router([backend(sim, "xai", "ot-fo-a"), backend(sim, "xai", "ot-fo-b", priority=2)],
                    pricing=PRICING)
    resp = await r.complete(PRICED, MESSAGES, agent_id="researcher", thread_id="t-42", max_tokens=64)
    spans = otel.spans()
    (req,) = by_name(spans, PRICED)
    failed, served = children(spans, req)
    assert req.kind is SpanKind.CLIENT and failed.kind is SpanKind.CLIENT
    assert (failed.name, served.name) == ("try ot-fo-a", "try ot-fo-b")
    a = req.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == PRICED
    assert a["gen_ai.request.max_tokens"] == 64 and a["gen_ai.conversation.id"] == "t-42"
    assert a["xpl.agent_id"] == "researcher" and a["xpl.backend"] == "ot-fo-b" and a["xpl.tries"] == 2
    assert a["gen_ai.usage.input_tokens"] == resp.usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == resp.usage["completion_tokens"]
    assert a["gen_ai.response.model"] == resp.model and a["xpl.outcome"] == "ok"
    assert a["xpl.cost_usd"] == pytest.approx(resp.cost_usd)
    assert req.status.status_code is not StatusCode.ERROR and "error.type" not in a
    f = failed.attributes
    assert f["error.type"] == "429" and f["xpl.outcome"] == "retried:429"
    assert f["xpl.cooldown_s"] == pytest.approx(0.1) and f["xpl.try"] == 1
    assert failed.status.status_code is StatusCode.ERROR
    assert f["gen_ai.provider.name"] == "x_ai" and f["server.address"] == "127.0.0.1"
    assert f["server.port"] == sim.port and f["gen_ai.usage.input_tokens"] == 0
    s = served.attributes
    assert s["xpl.try"] == 2 and s["xpl.outcome"] == "ok" and "error.type" not in s
    assert s["gen_ai.response.finish_reasons"] == (resp.finish_reason,)
    assert s["gen_ai.usage.input_tokens"] == resp.usage["prompt_tokens"]
    await r.aclose()


async def test_a_request_that_fails_is_an_error_span(sim, otel):
    sim.script("ot-err", [Fault.status(500)] * 3)
    r = make_router([backend(sim, "xai", "ot-err")], retries=1)
    with pytest.raises(ProviderError):
        await r.complete("grok-4.1", MESSAGES)
    (req,) = by_name(otel.spans(), "grok-4.1")
    tries = children(otel.spans(), req)
    assert [t.attributes["xpl.outcome"] for t in tries] == ["retried:500", "error:500"]
    assert req.attributes["error.type"] == "ProviderError" and req.status.status_code is StatusCode.ERROR
    assert tries[0].attributes["xpl.cooldown_s"] > 0 and "xpl.cooldown_s" in tries[1].attributes
    await r.aclose()


async def test_a_streams_spans_end_when_it_ends(sim, otel):
    r = make_router([backend(sim, "xai", "ot-stream")])
    s = r.stream("grok-4.1", MESSAGES, agent_id="streamer")
    text = [d async for d in s]
    assert text and s.response is not None
    (req,) = by_name(otel.spans(), "grok-4.1")
    (t,) = children(otel.spans(), req)
    assert req.attributes["gen_ai.usage.output_tokens"] == s.response.usage["completion_tokens"]
    assert t.end_time is not None and req.end_time >= t.end_time
    await r.aclose()


async def test_prompt_cache_and_reasoning_tokens_are_span_attributes(sim, otel):
    sim.set_usage_details("ot-cache-oa", cached=0.5, reasoning_tokens=4)
    sim.set_usage_details("ot-cache-an", cached=0.5, cache_write=0.25)
    r = make_router([backend(sim, "openai", "ot-cache-oa"), backend(sim, "anthropic", "ot-cache-an")])
    for model, streamed in (("gpt-4o", False), ("claude-sonnet-4-5", True)):
        if streamed:
            s = r.stream(model, MESSAGES)
            _ = [d async for d in s]
            resp = s.response
        else:
            resp = await r.complete(model, MESSAGES)
        assert resp is not None
        (req,) = by_name(otel.spans(), model)
        (served,) = children(otel.spans(), req)
        for a in (req.attributes, served.attributes):
            assert a["gen_ai.usage.input_tokens"] == resp.usage["prompt_tokens"]
            assert a["gen_ai.usage.cache_read.input_tokens"] == resp.usage["cached_tokens"] > 0
            assert a["gen_ai.usage.cache_creation.input_tokens"] == resp.usage["cache_write_tokens"]
            assert a["gen_ai.usage.reasoning.output_tokens"] == resp.usage["reasoning_tokens"]
    assert resp.usage["cache_write_tokens"] > 0                  # the Anthropic answer wrote to the cache
    (oa,) = by_name(otel.spans(), "gpt-4o")
    assert oa.attributes["gen_ai.usage.reasoning.output_tokens"] == 4
    await r.aclose()


async def test_token_and_cost_metrics_add_up_to_the_ledger_exactly(sim, otel):
    sim.script("ot-m-a", [Fault.status(503), Fault.status(429, retry_after=0.05)])
    names = {"ot-m-a", "ot-m-b"}
    r = make_router([backend(sim, "xai", "ot-m-a"), backend(sim, "xai", "ot-m-b")], strategy="round-robin",
                    pricing=PRICING)
    await asyncio.gather(*(r.complete(PRICED, MESSAGES, agent_id=f"ag{i % 3}", max_tokens=20 + i)
                           for i in range(40)))
    totals = r.get_all_usage(by="backend")
    for token_type, column in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        for name in names:
            points = [p for p in otel.points("gen_ai.client.token.usage", {name})
                      if p.attributes["gen_ai.token.type"] == token_type]
            assert sum(p.sum for p in points) == getattr(totals[name], column)
            assert all(tuple(p.explicit_bounds) == TOKEN_BUCKETS for p in points)
    per_agent = r.get_all_usage()
    for agent, usage in per_agent.items():
        points = [p for p in otel.points("gen_ai.client.token.usage", names) if p.attributes["xpl.agent_id"] == agent]
        assert sum(p.sum for p in points) == usage.total_tokens
    durations = otel.points("gen_ai.client.operation.duration", names)
    assert sum(p.count for p in durations) == len(r.usage_events())
    assert all(tuple(p.explicit_bounds) == DURATION_BUCKETS for p in durations)
    assert any(p.attributes.get("error.type") for p in durations)
    requests = otel.points("xpl.requests", names)
    assert sum(p.value for p in requests if p.attributes["xpl.outcome"] == "ok") == 40
    assert sum(p.value for p in requests if p.attributes["xpl.outcome"].startswith("retried:")) == 2
    cost = sum(p.value for p in otel.points("xpl.cost", names))
    assert cost == pytest.approx(sum(u.cost_usd or 0 for u in totals.values()), rel=1e-9)
    gauges = {(p.attributes["xpl.backend"], n): p.value for n in ("in_flight", "queued", "cooling_down")
              for p in otel.points(f"xpl.backend.{n}", names)}
    assert gauges[("ot-m-a", "in_flight")] == 0 and gauges[("ot-m-b", "queued")] == 0
    assert gauges[("ot-m-a", "cooling_down")] in (0, 1)
    await r.aclose()


def _all_attribute_text(otel: Otel, names: set[str]) -> str:
    texts = [json.dumps(dict(s.attributes or {}), default=str) + s.name + json.dumps(
        [dict(e.attributes or {}) for e in s.events], default=str) for s in otel.spans()]
    for metric in ("gen_ai.client.token.usage", "gen_ai.client.operation.duration", "xpl.requests", "xpl.cost"):
        texts += [json.dumps(dict(p.attributes)) for p in otel.points(metric, names)]
    return "\n".join(texts)


async def test_no_attribute_holds_a_key_or_by_default_message_text(sim, otel):
    secret_words = f"my key is {FAKE_KEYS['TEST_XAI_KEY']} please"
    messages = [{"role": "user", "content": secret_words}]
    sim.script("ot-sec", [Fault.status(401, message=f"bad key {FAKE_KEYS['TEST_XAI_KEY']}")])
    r = make_router([backend(sim, "xai", "ot-sec"), backend(sim, "xai", "ot-sec-2", priority=2)])
    await r.complete("grok-4.1", messages, agent_id="a")
    text = _all_attribute_text(otel, {"ot-sec", "ot-sec-2"})
    assert "try ot-sec" in text
    assert not any(key in text for key in FAKE_KEYS.values())
    assert "please" not in text and "gen_ai.input.messages" not in text
    await r.aclose()
    otel.exporter.clear()
    r = make_router([backend(sim, "xai", "ot-cap")], telemetry={"capture_content": True})
    resp = await r.complete("grok-4.1", messages, agent_id="a")
    (req,) = by_name(otel.spans(), "grok-4.1")
    assert "please" in req.attributes["gen_ai.input.messages"]          # asked for: the text is there
    assert FAKE_KEYS["TEST_XAI_KEY"] not in req.attributes["gen_ai.input.messages"]   # a key never
    (t,) = children(otel.spans(), req)
    output = json.loads(t.attributes["gen_ai.output.messages"])[0]["content"]
    assert output == resp.content.replace(FAKE_KEYS["TEST_XAI_KEY"], "xai...1111")   # the echoed key masked
    await r.aclose()


async def test_telemetry_off_records_nothing(sim, otel):
    r = make_router([backend(sim, "xai", "ot-off")], telemetry={"otel": False})
    assert not r.telemetry.enabled and r.telemetry.metrics_url is None
    await r.complete("grok-4.1", MESSAGES)
    assert by_name(otel.spans(), "grok-4.1") == [] and otel.points("xpl.requests", {"ot-off"}) == []
    await r.aclose()


async def test_prometheus_serves_the_histograms_and_the_backend_gauges(sim, otel):
    r = make_router([backend(sim, "xai", "ot-prom-a"), backend(sim, "xai", "ot-prom-b")],
                    strategy="round-robin", pricing=PRICING, telemetry={"prometheus_port": 0})
    url = r.telemetry.metrics_url
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    for i in range(4):
        await r.complete(PRICED, MESSAGES, agent_id=f"p{i % 2}")

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()

    body = await asyncio.to_thread(get)
    lines = body.splitlines()
    for name in ("gen_ai_client_token_usage_bucket", "gen_ai_client_operation_duration_seconds_bucket",
                 "gen_ai_client_operation_duration_seconds_sum", "xpl_requests_total", "xpl_cost_USD_total",
                 "xpl_backend_in_flight", "xpl_backend_queued", "xpl_backend_cooling_down"):
        assert any(line.startswith(name + "{") and 'xpl_backend="ot-prom-' in line for line in lines), name
    assert any('le="67108864' in line for line in lines)                 # the GenAI token buckets
    total = sum(float(line.rsplit(" ", 1)[1]) for line in lines
                if line.startswith("gen_ai_client_token_usage_sum{") and 'xpl_backend="ot-prom-' in line)
    assert total == sum(u.total_tokens for u in r.get_all_usage(by="backend").values())
    assert not any(key in body for key in FAKE_KEYS.values())
    # the shipped Grafana dashboard asks only for series that are served
    dashboard = json.loads(files("xml_pipeline_llm").joinpath("data", "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\b((?:gen_ai|xpl)_[a-zA-Z_]+)(?:\{|\[|$)", e)}
    served = {line.split("{")[0] for line in lines if not line.startswith("#")}
    assert wanted - served <= {"xpl_budget_remaining"}          # that one appears once budgets exist (in this process)
    await r.aclose()


async def test_budget_gauges_ask_the_router_for_its_budgets(sim, otel):
    from types import SimpleNamespace

    from xml_pipeline_llm import LLMRouter, load_config

    class WithBudgets(LLMRouter):          # the hook router.budgets() fills
        def budgets(self) -> list[Any]:
            return [SimpleNamespace(scope="agent", key="ot-budget-agent", remaining_tokens=900,
                                    remaining_usd=None)]

    r = WithBudgets(load_config({"llm": {"backends": [backend(sim, "xai", "ot-budget")]}}))
    data = otel.reader.get_metrics_data()
    points = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == "xpl.budget.remaining" for p in m.data.data_points
              if p.attributes.get("xpl.budget.key") == "ot-budget-agent"]
    assert [(p.value, p.attributes["xpl.budget.unit"]) for p in points] == [(900, "tokens")]
    await r.aclose()


async def test_the_try_span_is_the_current_span_while_the_provider_is_called(sim, otel):
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    seen: list[int] = []

    class Watch(CustomLogger):            # what LiteLLM's own callbacks (and HTTP instrumentation) see
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            seen.append(trace.get_current_span().get_span_context().span_id)

    watch = Watch()
    litellm.callbacks.append(watch)
    try:
        sim.script("ot-cur-a", [Fault.status(500)])
        r = make_router([backend(sim, "xai", "ot-cur-a"), backend(sim, "xai", "ot-cur-b", priority=2)],
                        retry_base_delay=0.01)
        await r.complete("grok-4.1", MESSAGES)
    finally:
        litellm.callbacks.remove(watch)
    spans = otel.spans()
    (req,) = by_name(spans, "grok-4.1")
    tries = children(spans, req)
    assert [s.name for s in tries] == ["try ot-cur-a", "try ot-cur-b"]
    assert seen == [s.context.span_id for s in tries]
    assert trace.get_current_span().get_span_context().span_id not in seen    # not left current after
    assert tries[0].status.status_code is StatusCode.ERROR and not tries[0].events[1:]
    await r.aclose()


async def test_response_cache_hits_are_counted_apart_from_provider_calls(sim, otel):
    r = make_router([backend(sim, "xai", "ot-cache-hit")], cache={},
                    pricing={"grok-4.1": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}})
    first = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    for _ in range(3):
        assert (await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)).cache_hit
    assert sum(p.value for p in otel.points("xpl.cache.hits", {"ot-cache-hit"})) == 3
    assert sum(p.value for p in otel.points("xpl.cache.saved", {"ot-cache-hit"})) == pytest.approx(3 * first.cost_usd)
    assert sum(p.value for p in otel.points("xpl.requests", {"ot-cache-hit"})) == 1
    assert sum(p.value for p in otel.points("xpl.cost", {"ot-cache-hit"})) == pytest.approx(first.cost_usd)
    await r.aclose()
