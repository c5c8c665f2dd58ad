"""One event loop's client: commands batched into pipelines, one deadline per batch, a cluster's nodes."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from .health import unreachable

log = logging.getLogger("xml_pipeline_llm")
Op = tuple[tuple[Any, ...], "asyncio.Future[Any]", "Callable[[Any], None] | None"]   # op, its future, undo


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


def cluster_enabled(client: Any) -> bool:
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
