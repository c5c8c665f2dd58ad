"""Ways to run the simulator: in a background thread, or in the foreground.

The background thread owns its own event loop so that sync code and pytest
tests with per-test event loops can share one server for a whole session.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from .server import DEFAULT_BACKEND, Simulator
from .state import ALL_BACKENDS, Fault

#: Faults mixed in by ``--fault-rate``: the ones a router should survive.
DEMO_FAULTS = (
    Fault.status(429, retry_after=1),
    Fault.status(500),
    Fault.status(503),
    Fault.status(529),
    Fault.drop(),
    Fault.malformed(),
)


class SimulatorThread:
    """Runs a ``Simulator`` on a private event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = Simulator(host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> Simulator:
        """Start the thread and wait until the port is bound; re-raise bind errors here."""
        self._thread = threading.Thread(target=self._run, name="provider-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("provider simulator did not start in time")
        if self._error is not None:
            raise self._error
        return self.sim

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.sim.stop())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (which stops the server) and join the thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            with suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def run_simulator(host: str = "127.0.0.1", port: int = 0) -> Iterator[Simulator]:
    """``with run_simulator() as sim:`` a running simulator for sync code or a session fixture."""
    runner = SimulatorThread(host, port)
    sim = runner.start()
    try:
        yield sim
    finally:
        runner.stop()


def _print_flush(line: str) -> None:
    print(line, flush=True)


def describe(sim: Simulator, backend: str = DEFAULT_BACKEND) -> list[str]:
    """Human-readable base URLs for each provider format."""
    return [
        f"provider simulator listening on {sim.url}",
        f"  openai/xai api_base: {sim.base_url(backend, 'openai')}",
        f"  anthropic api_base:  {sim.base_url(backend, 'anthropic')}",
        f"  ollama api_base:     {sim.base_url(backend, 'ollama')}",
        f"  (any backend name works: replace /b/{backend}/ with /b/<name>/)",
    ]


async def _serve_until_signal(sim: Simulator, out: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / platform
            loop.add_signal_handler(sig, stop.set)
    async with sim:
        for line in describe(sim):
            out(line)
        await stop.wait()
        out("provider simulator stopping")


def run_foreground(host: str = "127.0.0.1", port: int = 0, fault_rate: float = 0.0, latency: float = 0.0,
                   out: Callable[[str], None] = _print_flush) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code (0 on a clean stop, 1 if it cannot bind)."""
    sim = Simulator(host, port)
    if fault_rate > 0:
        sim.set_fault_rate(ALL_BACKENDS, fault_rate, list(DEMO_FAULTS))
    if latency > 0:
        sim.set_latency(ALL_BACKENDS, latency)
    try:
        asyncio.run(_serve_until_signal(sim, out))
    except KeyboardInterrupt:
        out("provider simulator stopped")
    except OSError as exc:
        out(f"provider simulator cannot listen on {host}:{port}: {exc.strerror or exc}")
        return 1
    return 0
