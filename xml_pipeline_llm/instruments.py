"""The package's OpenTelemetry instruments: histograms, counters, observable gauges, Prometheus.

Made once per meter provider and shared by the routers on it; the observable
gauges ask every live ``Gauges`` source (each router's telemetry) for its values.
OpenTelemetry is imported only inside these functions (the ``[otel]`` extra).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from .errors import ConfigError

#: Bucket boundaries the OpenTelemetry GenAI semantic conventions advise.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
                 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                    81.92)
SCOPE = "xml_pipeline_llm"


class Gauges(Protocol):
    """A source of gauge values: (gauge, value, attributes) for each of its backends and budgets."""

    def gauges(self) -> Iterator[tuple[str, float, dict[str, Any]]]: ...


#: the gauge sources the observable gauges read (a router's telemetry while it is open)
LIVE: weakref.WeakSet[Gauges] = weakref.WeakSet()
_LOCK = threading.Lock()
_BY_PROVIDER: dict[int, Instruments] = {}
_SERVERS: dict[tuple[str, int], tuple[Any, str]] = {}


class Instruments:
    """The package's instruments on one meter provider (made once per provider, shared by its routers)."""

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter(SCOPE)
        self.provider = provider
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per provider call",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS))
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of each provider call",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS))
        self.requests = meter.create_counter(
            "xpl.requests", unit="{request}", description="Provider calls (tries), by xpl.outcome")
        self.cost = meter.create_counter("xpl.cost", unit="USD", description="Cost of the priced provider calls")
        self.cache_hits = meter.create_counter(
            "xpl.cache.hits", unit="{request}", description="Requests the response cache answered")
        self.saved = meter.create_counter(
            "xpl.cache.saved", unit="USD", description="What cached answers cost originally")
        for name, what in (("in_flight", "Calls in flight per backend"),
                           ("queued", "Calls waiting for a backend's limits"),
                           ("cooling_down", "1 while a backend cools down after a failure, else 0"),
                           ("circuit_open", "1 while a backend's circuit breaker is open or half open, else 0")):
            meter.create_observable_gauge(f"xpl.backend.{name}", callbacks=[_observe(name)],
                                          unit="{call}" if name in ("in_flight", "queued") else "1",
                                          description=what)
        meter.create_observable_gauge("xpl.budget.remaining", callbacks=[_observe("budget_remaining")],
                                      description="What is left of each budget (xpl.budget.unit: tokens or usd)")


def instruments(provider: Any) -> Instruments:
    with _LOCK:
        found = _BY_PROVIDER.get(id(provider))
        if found is None or found.provider is not provider:
            found = _BY_PROVIDER[id(provider)] = Instruments(provider)
        return found


def _observe(gauge: str) -> Any:
    from opentelemetry.metrics import Observation

    def callback(options: Any) -> list[Any]:
        out = []
        for tel in list(LIVE):
            for name, value, attrs in tel.gauges():
                if name == gauge:
                    out.append(Observation(value, attrs))
        return out

    return callback


def prometheus(host: str, port: int) -> tuple[Any, str]:
    """An SDK meter provider whose metrics are served on ``http://host:port/metrics`` (once per process)."""
    with _LOCK:
        found = _SERVERS.get((host, port))
        if found is not None:
            return found
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as exc:
            raise ConfigError(f"llm.telemetry.prometheus_port: needs OpenTelemetry's Prometheus exporter "
                              f"({exc.name} is missing); pip install 'xml-pipeline-llm[otel]'") from None
        registry: Any = CollectorRegistry()
        try:
            reader = PrometheusMetricReader(registry=registry)
        except TypeError:                   # exporters before registry=: the process-wide registry
            import prometheus_client

            registry = prometheus_client.REGISTRY
            reader = PrometheusMetricReader()
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            reader.shutdown()
            raise ConfigError(f"llm.telemetry.prometheus_port: cannot serve /metrics on {host}:{port} "
                              f"({exc.strerror or exc}); choose a free port or stop what holds it") from None
        shown = f"[{host}]" if ":" in host else host
        found = (MeterProvider(metric_readers=[reader]), f"http://{shown}:{server.server_port}/metrics")
        _SERVERS[(host, port)] = found
        if port == 0:
            _SERVERS[(host, server.server_port)] = found
        return found
