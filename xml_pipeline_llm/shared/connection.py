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
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError
from ..redact import redact_url
from ..redact import url_secrets as _secrets
from .scripts import Script

log = logging.getLogger("xml_pipeline_llm")

DEFAULT_LEASE = 10.0
T = TypeVar("T")
Op = tuple[tuple[Any, ...], "asyncio.Future[Any]", "Callable[[Any], None] | None"]   # op, its future, undo
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


class RedisDown(Exception):
    """Redis did not answer; the caller falls back to local state."""


def _errors() -> tuple[type[BaseException], ...]:
    import redis
    from redis.exceptions import RedisClusterException

    return (redis.RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def unreachable(exc: BaseException) -> bool:
    """Whether a command's error means "Redis (or that cluster node) is not there now", not a bad script."""
    from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError
    from redis.exceptions import ConnectionError as Lost
    from redis.exceptions import TimeoutError as Slow

    return isinstance(exc, (Lost, Slow, ClusterError, TryAgainError, AskError, RedisClusterException,
                            OSError, asyncio.TimeoutError))


def _cluster_url(url: str) -> str | None:
    """The redis:// (or rediss://) URL redis-py's cluster client takes for a ``redis+cluster://`` one."""
    if not url.startswith(CLUSTER_SCHEMES):
        return None
    scheme, rest = url.split("://", 1)
    return scheme.replace("+cluster", "") + "://" + rest


class Health:
    """Whether Redis answers; the WARNING when it stops (at most once a minute) and when it is back."""

    WARN_EVERY = 60.0

    def __init__(self, shown: str, secrets: list[str], probe: float) -> None:
        self.shown = shown
        self.secrets = secrets
        self.probe = probe
        self.down = False
        self.retry_at = 0.0
        self.last_warn = -math.inf
        self.warned = False          # an "unreachable" WARNING was shown and no "answers again" yet
        self.lock = threading.Lock()

    def usable(self) -> bool:
        """Up, or down long enough that it is time to try again."""
        return not self.down or time.monotonic() >= self.retry_at

    def reason(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text[:160]}"

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self.lock:
            self.retry_at = now + self.probe
            self.down = True
            warn = now - self.last_warn >= self.WARN_EVERY
            if warn:
                self.last_warn = now
                self.warned = True
        if warn:
            log.warning("shared state: Redis at %s is unreachable (%s); limits, cooldowns, rotation and "
                        "usage totals continue in this process only until it answers again "
                        "(retried every %gs; this warning repeats at most once a minute)",
                        self.shown, self.reason(exc), self.probe)
        else:
            log.debug("shared state: Redis at %s did not answer (%s)", self.shown, self.reason(exc))

    def ok(self) -> None:
        if self.down:
            with self.lock:
                was, self.down = self.down, False
                warned, self.warned = self.warned and was, self.warned and not was
            if warned:
                log.warning("shared state: Redis at %s answers again; shared limits, cooldowns and "
                            "usage resumed", self.shown)
            elif was:      # one cluster node away while others answer: no WARNING each time
                log.debug("shared state: Redis at %s answers again", self.shown)


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
        from .worker import Worker

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
            single_on_cluster = not self.cluster and _cluster_enabled(self.sync)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            if self.place == "llm.shared_state":
                from ..config import REDIS_ENV

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
        except _errors() as exc:
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
            if fut.cancelled() or isinstance(exc, _errors()):
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
        except _errors() as exc:
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
        except _errors() as exc:
            self.health.failed(exc)
            raise RedisDown() from None
        lost = next((r for r in results if isinstance(r, Exception) and unreachable(r)), None)
        if lost is None:
            self.health.ok()
        else:
            self.health.failed(lost)
        return results


class LoopClient:
    """One event loop's client, sending what the loop asks for in one pipeline per loop iteration.

    Every request needs a few short Redis operations (the admission, the
    release, the budget settlement, the usage record); those that many
    requests issue in the same iteration of the event loop go to Redis
    together, in one round trip, instead of one connection and round trip each.

    A batch is written on a connection of this loop's own (kept idle between
    batches, at most ``max_connections`` busy) and its replies read back in
    order: redis-py's connection packs and parses, but its pipeline and pool
    checkout cost more CPU than the round trip itself (``bench_redis.py``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any, limit: int = 64,
                 timeout: float = 2.0) -> None:
        self.loop = weakref.ref(loop)
        self.timeout = timeout
        self.client = client
        self.pending: list[Op] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.idle: list[Any] = []            # this loop's connections between batches
        self.made: set[Any] = set()          # all of them, idle or busy
        self.busy = asyncio.Semaphore(limit)

    def submit(self, op: tuple[Any, ...], undo: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        """Queue ``op`` for this loop's next batch; its future.

        ``undo(result)`` is called if the future was cancelled while the op was on
        its way and Redis carried it out all the same.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:          # the batch goes out when the loop next runs its ready callbacks
            task = loop.create_task(self._send())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.pending.append((op, fut, undo))
        return fut

    async def _send(self) -> None:
        from redis.exceptions import NoScriptError

        batch, self.pending = self.pending, []
        try:
            ops = [op for op, _, _ in batch]
            results = await self._attempt(ops, use_sha=True)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:        # Redis does not know a script yet (or restarted): send its text
                again = await self._attempt([ops[i] for i in missing], use_sha=False)
                for i, r in zip(missing, again):
                    results[i] = r
        except BaseException as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                    else:
                        fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut, undo), result in zip(batch, results):
            if fut.done():            # its caller was cancelled meanwhile
                if undo is not None and fut.cancelled() and not isinstance(result, Exception):
                    undo(result)
            elif isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _attempt(self, ops: list[tuple[Any, ...]], use_sha: bool) -> list[Any]:
        """Send ``ops`` in one pipeline: a result per op (errors in place), or raise."""
        from redis.exceptions import ConnectionError as Lost

        try:
            return await self._pipeline(ops, use_sha)
        except Lost:
            # Most often a connection kept from before Redis restarted: the server
            # closed it without seeing these commands.  Drop the idle connections
            # (the rest are as stale) and send once more; a real outage fails again.
            await self._drop_idle()
            return await self._pipeline(ops, use_sha)

    async def _pipeline(self, ops: list[tuple[Any, ...]], use_sha: bool) -> list[Any]:
        commands = [_command(op, use_sha) for op in ops]
        async with self.busy:
            if self.idle:
                conn = self.idle.pop()
            else:
                conn = self.client.connection_pool.make_connection()
                self.made.add(conn)
            try:
                if sys.version_info >= (3, 11):   # one deadline for the batch (no task per read)
                    async with asyncio.timeout(self.timeout):
                        out = await self._exchange(conn, commands)
                else:                              # pragma: no cover - Python 3.10
                    out = await asyncio.wait_for(self._exchange(conn, commands), self.timeout)
            except BaseException:
                await self._disconnect(conn)
                raise
            self.idle.append(conn)
        return out

    @staticmethod
    async def _exchange(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write the commands, read a reply per command (an error in its place)."""
        from redis.exceptions import ResponseError

        if not conn.is_connected:
            await conn.connect()
        await conn.send_packed_command(_pack(commands), check_health=False)
        out: list[Any] = []
        for _ in commands:
            try:
                out.append(await conn.read_response())
            except ResponseError as exc:     # this command's error; the replies stay in step
                out.append(exc)
        return out

    async def _disconnect(self, conn: Any) -> None:
        self.made.discard(conn)
        try:
            await conn.disconnect()
        except Exception:  # noqa: BLE001 - it is going away either way
            pass

    async def _drop_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            await self._disconnect(conn)

    async def aclose(self) -> None:
        """Close this client's connections (on its own loop)."""
        await self._drop_idle()
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001
            pass

    def abandon(self) -> None:
        """Drop the sockets of a client whose event loop has ended (it cannot be awaited any more)."""
        made, self.made, self.idle = list(self.made), set(), []
        _abandon(self.client, made)


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands in the Redis protocol (RESP): what redis-py's packer makes, for a fraction of its CPU.

    Arguments are str, int, float (sent as ``repr``) or bytes, as everywhere in this package.
    """
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            raw = arg if isinstance(arg, bytes) else (repr(arg) if isinstance(arg, float) else str(arg)).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def _command(op: tuple[Any, ...], use_sha: bool) -> tuple[Any, ...]:
    """The Redis command of a batched op: a script by EVALSHA (or EVAL with its text), or a plain one."""
    if op[0] != "eval":
        return tuple(op[1])
    _, script, keys, args = op
    if use_sha:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)
    return ("EVAL", script.src, len(keys), *keys, *args)


class ClusterLoopClient(LoopClient):
    """A loop's client of a Redis Cluster: one pipeline per node, so a node away fails its own ops only.

    redis-py's cluster pipeline follows MOVED and ASK, but when one node cannot
    be reached it raises for the whole pipeline, hiding what the other nodes
    already did (a usage record written, then written again when replayed).
    Each node's share is therefore sent on its own, and a failure is that share's.
    The cluster client raises instead of waiting when a node's pool is full, so
    the pipelines in flight are limited to the pool size.
    """

    REFRESH_EVERY = 1.0      # seconds between topology refreshes while a node fails

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any, limit: int) -> None:
        super().__init__(loop, client, limit)
        self.next_refresh = 0.0

    async def _pipeline(self, ops: list[tuple[Any, ...]], use_sha: bool) -> list[Any]:
        """A node's share, through the cluster client's pipeline (it follows MOVED and ASK)."""
        pipe = self.client.pipeline(transaction=False)
        for op in ops:
            pipe.execute_command(*_command(op, use_sha))   # a cluster pipeline has no evalsha()
        return list(await pipe.execute(raise_on_error=False))

    async def _attempt(self, ops: list[tuple[Any, ...]], use_sha: bool) -> list[Any]:
        await self.client.initialize()
        shares: dict[str, tuple[Any, list[int]]] = {}
        for i, op in enumerate(ops):
            node = self.client.get_node_from_key(op[2][0] if op[0] == "eval" else op[1][1])
            shares.setdefault(node.name, (node, []))[1].append(i)
        results: list[Any] = [None] * len(ops)
        await asyncio.gather(*(self._share(node, [ops[i] for i in idx], idx, results, use_sha)
                               for node, idx in shares.values()))
        return results

    async def _share(self, node: Any, ops: list[tuple[Any, ...]], idx: list[int], results: list[Any],
                     use_sha: bool) -> None:
        from redis.exceptions import ConnectionError as Lost

        async with self.busy:
            try:
                try:
                    out = await self._pipeline(ops, use_sha)
                except Lost:
                    out = [Lost()] * len(ops)
                again = [j for j, r in enumerate(out) if isinstance(r, Lost)]
                if again:       # stale connections from before the node restarted: as in LoopClient
                    await node.disconnect_free_connections()
                    for j, r in zip(again, await self._pipeline([ops[j] for j in again], use_sha)):
                        out[j] = r
            except Exception as exc:  # noqa: BLE001 - this node's ops fail, the others stand
                out = [exc] * len(ops)
            if any(isinstance(r, Exception) and unreachable(r) for r in out):
                self._refresh_soon()
        for i, r in zip(idx, out):
            results[i] = r

    def _refresh_soon(self) -> None:
        """Ask the cluster for its nodes again (a replica may have taken over), at most once a second.

        redis-py's own command path does so after a connection error; its pipelines
        (with no client-side retries, as here) do not.
        """
        now = time.monotonic()
        if now < self.next_refresh:
            return
        self.next_refresh = now + self.REFRESH_EVERY

        async def refresh() -> None:
            try:
                await self.client.nodes_manager.initialize()
            except Exception as exc:  # noqa: BLE001 - still away: the next try says so
                log.debug("shared state: Redis Cluster topology not refreshed (%s)", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(refresh())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _cluster_enabled(client: Any) -> bool:
    """Whether a single-server client is talking to a cluster node (INFO may be refused: then no)."""
    try:
        return str(client.info("cluster").get("cluster_enabled", "0")) == "1"
    except Exception:  # noqa: BLE001
        return False


def _abandon(client: Any, own: list[Any]) -> None:
    """Drop the sockets of a client whose event loop has ended, and of ``own`` connections made for it."""
    pool = getattr(client, "connection_pool", None)
    conns = own + list(getattr(pool, "_available_connections", []) or []) + \
        list(getattr(pool, "_in_use_connections", []) or [])
    manager = getattr(client, "nodes_manager", None)        # a cluster client: each node's connections
    for node in list(getattr(manager, "nodes_cache", {}).values()) if manager is not None else []:
        conns += list(getattr(node, "_connections", []) or [])
    for conn in conns:
        writer = getattr(conn, "_writer", None)
        if writer is None:
            continue
        try:
            sock = getattr(writer.transport, "_sock", None)
            if sock is not None:
                sock.close()
        except Exception:  # noqa: BLE001
            pass
        conn._writer = conn._reader = None
