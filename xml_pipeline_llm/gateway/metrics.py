"""``GET /metrics`` of the gateway: the router's OpenTelemetry metrics as Prometheus text.

``install()`` (called by ``xml-pipeline-llm serve`` before the router is
built) makes an OpenTelemetry SDK meter provider with a Prometheus reader on a
registry of its own the global meter provider, so the router's instruments
report there.  With several workers each worker answers for itself and every
series carries ``xpl_worker="<n>"``: sum over that label for the gateway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger("xml_pipeline_llm.gateway")

_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def install(worker: int | None = None) -> Callable[[], bytes] | None:
    """Serve the router's metrics; the renderer of ``/metrics``, or None without the [otel] extra."""
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        return None
    current = metrics.get_meter_provider()
    if isinstance(current, MeterProvider):
        log.warning("/metrics: a meter provider is already set in this process; the gateway cannot add its "
                    "Prometheus reader to it (use llm.telemetry.prometheus_port instead)")
        return None
    registry: Any = CollectorRegistry()
    try:
        reader = PrometheusMetricReader(registry=registry)
    except TypeError:                                  # exporters before registry=
        import prometheus_client

        registry = prometheus_client.REGISTRY
        reader = PrometheusMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    def render() -> bytes:
        text: bytes = generate_latest(registry)
        return text if worker is None else label(text, "xpl_worker", str(worker))

    return render


def label(text: bytes, name: str, value: str) -> bytes:
    """Prometheus exposition text with ``name="value"`` added to every sample."""
    pair = f'{name}="{value}"'.encode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line) if line and not line.startswith(b"#") else None
        if m is None:
            out.append(line)
            continue
        labels = m.group(2)
        inner = pair if not labels or labels == b"{}" else labels[1:-1] + b"," + pair
        out.append(m.group(1) + b"{" + inner + b"}" + m.group(3))
    return b"\n".join(out) + b"\n"
