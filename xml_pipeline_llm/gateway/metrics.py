"""``GET /metrics`` of the gateway: the router's OpenTelemetry metrics as Prometheus text.

``install()`` (called by ``xml-pipeline-llm serve`` before the router is
built) makes an OpenTelemetry SDK meter provider with a Prometheus reader on a
registry of its own the global meter provider, so the router's instruments
report there.

With several workers, every series carries ``xpl_worker="<n>"`` and whichever
worker answers a scrape answers for the whole gateway: each worker writes its
own text to a private directory every ``SHARE_EVERY`` seconds (``share()``),
and ``/metrics`` merges its fresh text with its siblings' (at most that old),
one block per metric family.  Sum over ``xpl_worker`` for gateway totals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("xml_pipeline_llm.gateway")

_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")
SHARE_EVERY = 2.0


def install(worker: int | None = None, share_dir: Path | None = None) -> Callable[[], bytes] | None:
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

    def own() -> bytes:
        text: bytes = generate_latest(registry)
        return text if worker is None else label(text, "xpl_worker", str(worker))

    if share_dir is None or worker is None:
        return own

    def render() -> bytes:
        texts = [own()]
        mine = f"worker-{worker}.prom"
        for path in sorted(share_dir.glob("worker-*.prom")):
            if path.name != mine:
                try:
                    texts.append(path.read_bytes())
                except OSError:          # a worker that just stopped
                    pass
        return merge(texts)

    render.own = own          # type: ignore[attr-defined]
    return render


async def share(render: Callable[[], bytes], share_dir: Path, worker: int) -> None:
    """Write this worker's metrics for its siblings every ``SHARE_EVERY`` seconds (until cancelled)."""
    own = getattr(render, "own", render)
    path, tmp = share_dir / f"worker-{worker}.prom", share_dir / f".worker-{worker}.tmp"
    try:
        while True:
            try:
                tmp.write_bytes(own())
                os.replace(tmp, path)
            except OSError as exc:
                log.debug("/metrics: cannot share worker %d's metrics: %s", worker, exc)
            await asyncio.sleep(SHARE_EVERY)
    finally:
        try:
            path.unlink()
        except OSError:
            pass


def merge(texts: list[bytes]) -> bytes:
    """Several Prometheus texts as one: each metric family once (its HELP and TYPE), every text's samples."""
    families: dict[bytes, list[bytes]] = {}
    for text in texts:
        name = b""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
                name = line.split(b" ", 3)[2]
                block = families.setdefault(name, [])
                if line not in block:
                    block.append(line)
                continue
            families.setdefault(name, []).append(line)
    return b"\n".join(line for block in families.values() for line in block) + b"\n"


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
