"""The connection to Redis: clients per event loop, batching, and what happens when Redis goes away.

redis.asyncio clients are bound to the event loop that made them, so one
client (with its own small connection pool) is kept per running loop; a
router thus works across ``asyncio.run()`` calls and per-test loops.  Every
failure to reach Redis becomes ``RedisDown`` after ``Health`` has noted it, and
the callers fall back to this process's own state.

``rediss://`` is TLS (redis-py's own; ``ssl_ca_certs=...`` and the other ``ssl_*``
query parameters pass through).  ``redis+cluster://host:port`` (``rediss+cluster://``
with TLS) is a Redis Cluster, reached through redis-py's cluster clients, which
follow MOVED and ASK themselves; each Lua script is given keys of one hash tag,
so it runs on one node.  A loop's batch goes out as one pipeline per node, so a
node that is away fails its own commands only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..env import REDIS_ENV
from ..errors import ConfigError
from ..redact import redact_url
from ..redact import url_secrets as _secrets
from .health import Health, RedisDown, redis_errors, unreachable
from .loops import ClusterLoopClient, LoopClient, cluster_enabled
from .scripts import Script
from .worker import Worker

log = logging.getLogger("xml_pipeline_llm")

DEFAULT_LEASE = 10.0
T = TypeVar("T")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

def _cluster_url(url: str) -> str | None:
    """The redis:// (or rediss://) URL redis-py's cluster client takes for a ``redis+cluster://`` one."""
    if not url.startswith(CLUSTER_SCHEMES):
        return None
    scheme, rest = url.split("://", 1)
    return scheme.replace("+cluster", "") + "://" + rest


class Conn:
    """One Redis URL: a sync client, one asyncio client per event loop, health, background thread."""

    def __init__(self, url: str, *, lease: float = DEFAULT_LEASE, renew_every: float | None = None,
                 probe: float = 1.0, connect_timeout: float = 1.0, socket_timeout: float = 2.0,
                 max_connections: int = 64, place: str = "llm.shared_state") -> None:
        try:
            import redis
            from redis.asyncio.retry import Retry as AsyncRetry
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(f"{place}: Redis needs the redis package; install it with "
                              "pip install 'xml-pipeline-llm[redis]'") from None
        self.url = url
        self.place = place
        self.shown = redact_url(url)
        self.health = Health(self.shown, _secrets(url), probe)
        self.lease = float(lease)
        self.renew_every = float(renew_every or lease / 3)
        self.max_connections = max_connections
        cluster = _cluster_url(url)
        self.cluster = cluster is not None
        self._client_url = cluster or url
        # Our own rules decide what happens when Redis fails: no client-side retries.  The asyncio
        # clients get redis-py's asyncio Retry (given the sync one, redis-py warns at every start).
        self._opts: dict[str, Any] = dict(decode_responses=True, socket_connect_timeout=connect_timeout,
                                          socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
        self._aopts: dict[str, Any] = {**self._opts, "retry": AsyncRetry(NoBackoff(), 0)}
        self._sync: Any = None
        self._sync_lock = threading.Lock()
        try:
            if self.cluster:      # the cluster client connects when made: made on first use
                from redis.connection import parse_url

                db = parse_url(self._client_url).get("db")  # type: ignore[no-untyped-call]
                if db:
                    raise ConfigError(f'{place}: "{self.shown}": a Redis Cluster has only database 0; '
                                      f"remove /{db} from the URL")
            else:
                self._sync = redis.Redis.from_url(url, max_connections=max_connections, **self._opts)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f'{place}: "{self.shown}" is not a Redis URL ({self.health.reason(exc)}); '
                              "expected redis://host:port/db, rediss://host:port/db (TLS) or "
                              "redis+cluster://host:port (a Redis Cluster)") from None
        self._aclients: dict[int, LoopClient] = {}
        self.worker = Worker(self)

    @property
    def sync(self) -> Any:
        """The sync client (the worker thread's and the reads'); a cluster's is made on first use."""
        if self._sync is None:
            with self._sync_lock:
                if self._sync is None:
                    from redis.cluster import RedisCluster

                    self._sync = RedisCluster.from_url(self._client_url, max_connections=self.max_connections,
                                                       **self._opts)
        return self._sync

    def check(self) -> None:
        """Start-up check: a clear ConfigError when Redis does not answer."""
        try:
            self.sync.ping()
            single_on_cluster = not self.cluster and cluster_enabled(self.sync)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            if self.place == "llm.shared_state":
                fix = (f"correct the URL in llm.shared_state or ${REDIS_ENV}, or remove shared_state "
                       f"to keep limits and usage in this process only")
            else:
                fix = f"or correct the {self.place} URL"
            start = ("Start the cluster there (redis-server --cluster-enabled yes on each node, then "
                     "redis-cli --cluster create), use redis:// for a single server, "
                     if self.cluster else "Start Redis there (for example: redis-server --port 6379), ")
            raise ConfigError(
                f"{self.place}: cannot reach Redis at {self.shown} ({self.health.reason(exc)}). "
                f"{start}{fix}") from None
        if single_on_cluster:
            raise ConfigError(f"{self.place}: {self.shown} is a node of a Redis Cluster; use "
                              f"redis+cluster://{self.shown.split('://', 1)[1].split('/', 1)[0]} "
                              f"(rediss+cluster:// with TLS) so that every key reaches its node")

    # ---------------------------------------------------------- asyncio side

    def _loop_client(self) -> LoopClient:
        """The asyncio client of the running loop (made on first use in that loop)."""
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(id(loop))
        if entry is not None and entry.loop() is loop:
            return entry
        for key, old in list(self._aclients.items()):
            old_loop = old.loop()
            if old_loop is None or old_loop.is_closed() or key == id(loop):
                del self._aclients[key]
                old.abandon()
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster

            client = RedisCluster.from_url(self._client_url, max_connections=self.max_connections, **self._aopts)
            entry = self._aclients[id(loop)] = ClusterLoopClient(loop, client, self.max_connections)
            return entry
        import redis.asyncio as aredis

        # No socket timeout on the connections themselves: a batch has one deadline (LoopClient).
        opts = {**self._aopts, "socket_timeout": None}
        pool = aredis.BlockingConnectionPool.from_url(self.url, max_connections=self.max_connections,
                                                      timeout=30, **opts)
        entry = self._aclients[id(loop)] = LoopClient(loop, aredis.Redis(connection_pool=pool),
                                                      self.max_connections, self._opts["socket_timeout"])
        return entry

    async def _await(self, futs: list[asyncio.Future[Any]]) -> list[Any]:
        try:
            results = [await f for f in futs]
        except redis_errors() as exc:
            self.health.failed(exc)
            raise RedisDown() from None
        self.health.ok()
        return results

    async def eval(self, script: Script, keys: list[str], args: list[Any],
                   undo: Callable[[Any], None] | None = None) -> Any:
        """Run ``script``; RedisDown (after noting it) when Redis does not answer.

        ``undo(result)`` is called when the caller is cancelled while the script
        is on its way and it ran all the same (a slot or a budget hold taken for
        nobody goes back).
        """
        if not self.health.usable():
            raise RedisDown()
        fut = self._loop_client().submit(("eval", script, keys, args), undo)
        try:
            return (await self._await([fut]))[0]
        except asyncio.CancelledError:      # (cancelled while on its way: the batch calls undo)
            if undo is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                undo(fut.result())          # it had come back, but the caller was cancelled
            raise

    def eval_soon(self, script: Script, keys: list[str], args: list[Any], then: Callable[[Any], None],
                  lost: Callable[[], None]) -> None:
        """Run ``script`` without waiting for it (in this loop's next batch).

        ``then(result)`` once it ran; ``lost()`` if Redis did not answer, or the loop
        shut down first (the caller hands the work to the background thread).
        """
        if not self.health.usable():
            lost()
            return

        def done(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled() or isinstance(exc, redis_errors()):
                if exc is not None:
                    self.health.failed(exc)
                lost()
            elif exc is not None:
                raise exc
            else:
                self.health.ok()
                then(fut.result())

        self._loop_client().submit(("eval", script, keys, args)).add_done_callback(done)

    async def commands(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run plain commands (one round trip with whatever else this loop sends now)."""
        if not self.health.usable():
            raise RedisDown()
        lc = self._loop_client()
        return await self._await([lc.submit(("cmd", c)) for c in commands])

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for key, entry in list(self._aclients.items()):
            del self._aclients[key]
            if entry.loop() is loop:
                await entry.aclose()
            else:
                entry.abandon()
        await loop.run_in_executor(None, self.worker.flush, 5.0)

    async def drain(self) -> None:
        """Wait for what this loop has sent or is about to send."""
        entry = self._aclients.get(id(asyncio.get_running_loop()))
        while entry is not None and (entry.pending or entry.tasks):
            await asyncio.gather(*list(entry.tasks), return_exceptions=True)

    # ---------------------------------------------------------- sync side

    def sync_call(self, fn: Callable[[Any], T]) -> T:
        """``fn(sync client)``; RedisDown (after noting it) when Redis does not answer."""
        if not self.health.usable():
            raise RedisDown()
        try:
            result = fn(self.sync)
        except redis_errors() as exc:
            self.health.failed(exc)
            raise RedisDown() from None
        self.health.ok()
        return result

    def sync_scripts(self, calls: list[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """Run scripts in one pipeline (one per node on a cluster); a result per call, errors in place.

        RedisDown when none could be sent.  On a cluster some may fail while others
        went through (a node away): those results are errors for which ``unreachable``
        holds, and the health notes it.
        """
        def send(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.execute_command("EVAL", script.src, len(keys), *keys, *args)
            return list(pipe.execute(raise_on_error=False))

        if not self.health.usable():
            raise RedisDown()
        try:
            results = send(self.sync)
        except redis_errors() as exc:
            self.health.failed(exc)
            raise RedisDown() from None
        lost = next((r for r in results if isinstance(r, Exception) and unreachable(r)), None)
        if lost is None:
            self.health.ok()
        else:
            self.health.failed(lost)
        return results


__all__ = ["DEFAULT_LEASE", "Conn", "Health", "RedisDown", "log", "unreachable"]
