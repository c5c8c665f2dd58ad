"""``xml-pipeline-llm serve``: the gateway's processes, socket and signals.

One worker serves in this process.  ``--workers N`` (N > 1, which needs
``llm.shared_state`` so that limits, budgets and usage hold across them)
binds the listening socket(s) here, then forks N workers; this process only
forwards signals and waits.  Where the system has ``SO_REUSEPORT`` (Linux,
FreeBSD), each worker listens on a socket of its own, all bound before any
worker starts, and the kernel spreads new connections evenly over them.  On one shared socket, whichever worker wakes
first accepts a whole burst of connections, and kept-alive clients then stay
on it, so a few clients could load one worker while the others idle.

SIGTERM or SIGINT: each worker stops accepting (its listening socket is
closed, so new connections are refused, and a request arriving on a kept-alive
connection is answered 503), lets the calls in flight finish for up to
``grace`` seconds (then cancels them, which gives their reservations back),
flushes and closes the usage ledger and shared state (``router.aclose()``)
and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _litellm
from ..errors import ConfigError
from ..router import LLMRouter
from .app import Gateway, aiohttp_app
from .auth import Keys, check_bind, load_keys
from .metrics import install, share

if TYPE_CHECKING:
    from ..config import RouterConfig

log = logging.getLogger("xml_pipeline_llm.gateway")


REUSE_PORT = hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith(("linux", "freebsd"))


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is one), or ConfigError naming the fix.
    ``reuse_port``: one of several sockets on the address (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"llm.gateway: cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                          f"another --port, or stop what holds it") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def serve(config: RouterConfig, *, host: str | None = None, port: int | None = None, workers: int = 1,
          grace: float = 30.0, out: Callable[[str], None] | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; the exit status."""
    say = out or (lambda line: print(line, file=sys.stderr, flush=True))
    g = config.gateway
    host = host or g.host
    port = g.port if port is None else port
    keys = load_keys(g)
    check_bind(host, keys)
    if workers > 1 and not config.shared_state:
        raise ConfigError(f"--workers {workers}: several workers need llm.shared_state (redis://host:port/db) so "
                          f"that limits, budgets and usage hold across them; set it, or run one worker")
    per_worker = workers > 1 and REUSE_PORT       # the workers listen on sockets of their own
    sock = bind(host, port, reuse_port=per_worker)
    socks = [sock]
    if per_worker:
        socks += [bind(host, sock.getsockname()[1], reuse_port=True) for _ in range(workers - 1)]
    shown = f"[{host}]" if ":" in host else host
    auth = f"{len(keys)} key{'s' if len(keys) != 1 else ''}" if keys.enabled else "no keys: loopback only"
    say(f"xml-pipeline-llm gateway listening on http://{shown}:{sock.getsockname()[1]}/v1 "
        f"({workers} worker{'s' if workers > 1 else ''}, {auth}; {config.source})")
    if workers == 1:
        return run_worker(config, keys, sock, grace, None)
    share_dir = Path(tempfile.mkdtemp(prefix="xpl-gateway-metrics-"))     # mode 0700
    try:
        return _supervise(config, keys, socks, grace, workers, say, share_dir)
    finally:
        for s in socks:
            s.close()
        shutil.rmtree(share_dir, ignore_errors=True)


def _supervise(config: RouterConfig, keys: Keys, socks: list[socket.socket], grace: float, workers: int,
               say: Callable[[str], None], share_dir: Path) -> int:
    """Fork the workers, forward SIGTERM/SIGINT to them, wait for them all.

    ``socks``: one listening socket for all the workers, or one per worker (``SO_REUSEPORT``).
    """
    children: dict[int, int] = {}
    parent = os.getpid()
    for i in range(workers):
        pid = os.fork()
        if pid == 0:                                   # the worker
            code = 1
            try:
                mine = socks[i % len(socks)]
                for other in socks:
                    if other is not mine:
                        other.close()
                code = run_worker(config, keys, mine, grace, i, share_dir, parent)
            except BaseException as exc:               # never return into the parent's code
                log.error("worker %d: %s", i, exc)
            finally:
                os._exit(code)
        children[pid] = i
    for sock in socks:                                 # the workers hold them now
        sock.close()
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, code = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        i = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0:
            status = 1
            if not stopping:
                say(f"worker {i} (pid {pid}) exited with status {exit_code}; stopping the others")
                forward(signal.SIGTERM, None)
    say("xml-pipeline-llm gateway stopped")
    return status


def run_worker(config: RouterConfig, keys: Keys, sock: socket.socket, grace: float, worker: int | None,
               share_dir: Path | None = None, parent: int | None = None) -> int:
    """Serve on ``sock`` in this process until SIGTERM/SIGINT (or, for a forked worker, until its
    supervising process ``parent`` is gone), then drain; the exit status."""
    asyncio.run(_worker(config, keys, sock, grace, worker, share_dir, parent))
    return 0


async def _orphaned(parent: int, stop: asyncio.Event) -> None:
    """Stop a worker whose supervisor died without forwarding a signal (SIGKILL): no orphans keep the port."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("gateway worker %d: the supervising process %d is gone; stopping", os.getpid(), parent)
    stop.set()


async def _worker(config: RouterConfig, keys: Keys, sock: socket.socket, grace: float, worker: int | None,
                  share_dir: Path | None, parent: int | None) -> None:
    from aiohttp import web

    render = install(worker, share_dir)
    asyncio.get_running_loop().set_default_executor(_litellm.InlineSetup())   # see _litellm/inline.py
    _litellm.load()                          # LiteLLM's import (seconds) before the first caller, not in its call
    router = LLMRouter(config)
    gateway = Gateway(lambda: router, keys, metrics=render)
    runner = web.AppRunner(aiohttp_app(gateway), handler_cancellation=True, shutdown_timeout=grace,
                           access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(_orphaned(parent, stop))] if parent is not None else []
    if render is not None and share_dir is not None and worker is not None:
        tasks.append(asyncio.ensure_future(share(render, share_dir, worker)))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        gateway.draining = True
        log.info("gateway%s draining (up to %gs)", "" if worker is None else f" worker {worker}", grace)
        await runner.cleanup()              # stop listening, wait for handlers up to grace, then cancel
        await router.aclose()               # flush the ledger, close shared state
