"""Shared state in Redis: one quota, one set of cooldowns and one rotation for a fleet (contract C8).

``shared_state: redis://host:port/db`` (or ``$XML_PIPELINE_LLM_REDIS_URL``) makes
every process using the same Redis and ``redis_prefix`` share:

* the token bucket of each rate-limited backend (hash ``<p>:bucket:<backend>``),
  kept by Lua scripts on Redis server time, so N processes share one
  ``rate_limit_tpm`` instead of using N times it;
* the concurrency slots of each backend (sorted set ``<p>:slots:<backend>``:
  one member per call in flight, scored by its lease expiry).  A process
  renews the leases it holds every ``lease / 3`` seconds from a background
  thread; the slots of a process that dies (SIGKILL included) come back when
  their lease runs out (10 s by default, ``$XML_PIPELINE_LLM_REDIS_LEASE``);
* cooldowns (``<p>:cool:<backend>``, a key that expires when the cooldown ends;
  a longer cooldown is never shortened);
* the round-robin position per model (``<p>:rr:<model>``, an INCR counter that
  expires after a week unused);
* the usage totals (``redis_usage.py``).

Within one process waiters for a backend are served first come, first served
(one "head" waiter per backend polls Redis, the others wait behind it, exactly
as in memory).  Across processes there is no strict FIFO: a freed slot goes to
whichever process asks first (waiters poll with a backoff from 2 to 50 ms, and
a process's own release wakes its waiter at once).  For tokens, the oldest
waiter of the fleet whose tokens are not there yet *claims* them (for two
seconds at a time, renewed while it waits): other processes then only take
tokens above the claimed amount, so a large request is never starved by a
stream of small ones from elsewhere.

If Redis goes away while running, calls go on with this process's own
in-memory limits, cooldowns and rotation (a ``MemoryState``), with a WARNING at
most once a minute; Redis is tried again every second and shared state resumes
when it answers.  Usage recorded meanwhile is written to Redis when it is back.

redis.asyncio clients are bound to the event loop that made them, so one
client (with its own small connection pool) is kept per running loop; a
router thus works across ``asyncio.run()`` calls and per-test loops.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import math
import os
import queue
import random
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigError
from .state import MemoryState

log = logging.getLogger("xml_pipeline_llm")

LEASE_ENV = "XML_PIPELINE_LLM_REDIS_LEASE"
REDIS_ENV = "XML_PIPELINE_LLM_REDIS_URL"
DEFAULT_LEASE = 10.0
ROTATION_TTL_MS = 7 * 24 * 3600 * 1000
CLAIM_TTL_MS = 2000          # a waiting request's claim on a bucket, renewed while it waits
TOKEN_POLL_MAX = 0.25        # longest nap between bucket polls (refunds elsewhere are seen this fast)


class RedisDown(Exception):
    """Redis did not answer; the caller falls back to local state."""


# ------------------------------------------------------------------ Lua

class Script:
    """A Lua script, run by EVALSHA (loaded with EVAL when Redis does not know it yet)."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.sha = hashlib.sha1(src.encode()).hexdigest()


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function f(x) return string.format('%.17g', x) end
"""

# KEYS: bucket, slots.  ARGV: tokens, capacity (0: no bucket), refill per ms, max_concurrent,
# lease ms, lease id, waiter id, claim ms, when the waiter started waiting (server ms; '' on its
# first try).  Takes a slot and the tokens together or nothing.  A waiter whose tokens are not
# there claims them (amount, expiry) unless an older waiter holds the claim; others then only
# take tokens above the claimed amount, so the oldest waiter of the fleet is served first.
# Returns {ok, in flight, bucket level, ms until the tokens are there, server ms now}.
ENTER = Script(_NOW + """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local me = ARGV[7]
local since = tonumber(ARGV[9]) or now
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local count = redis.call('ZCARD', KEYS[2])
local slot_ok = count < tonumber(ARGV[4])
local tok_ok = true
local level = 0
local wait = 0
if cap > 0 then
  local h = redis.call('HMGET', KEYS[1], 'level', 'ts', 'cid', 'camt', 'cexp', 'csince')
  level = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  if now > ts then level = math.min(cap, level + (now - ts) * rate) end
  local other = 0
  local mine = false
  if h[3] and (tonumber(h[5]) or 0) > now then
    if h[3] == me then
      mine = true
    elseif (tonumber(h[6]) or now) <= since then
      other = tonumber(h[4]) or 0
    end
  end
  if n > 0 and level - other < n then
    tok_ok = false
    wait = (n + other - level) / rate
  end
  if slot_ok and tok_ok then
    level = level - n
    if mine then redis.call('HDEL', KEYS[1], 'cid', 'camt', 'cexp', 'csince') end
  elseif mine or (not tok_ok and other == 0) then
    redis.call('HSET', KEYS[1], 'cid', me, 'camt', f(n), 'cexp', f(now + tonumber(ARGV[8])),
               'csince', f(since))
  end
  redis.call('HSET', KEYS[1], 'level', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate) + 60000)
end
if slot_ok and tok_ok then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 2))
  return {1, count + 1, f(level), '0', f(now)}
end
return {0, count, f(level), f(wait), f(since)}
""")

# KEYS: bucket, slots.  ARGV: lease id ('' for none), tokens to give back (taken - used;
# negative charges the excess), capacity (0: no bucket), refill per ms.
# Returns {in flight, bucket level}.
LEAVE = Script(_NOW + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local cap = tonumber(ARGV[3])
local level = 0
if cap > 0 then
  local rate = tonumber(ARGV[4])
  local h = redis.call('HMGET', KEYS[1], 'level', 'ts')
  level = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  if now > ts then level = math.min(cap, level + (now - ts) * rate) end
  level = math.min(cap, level + tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], 'level', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate) + 60000)
end
return {redis.call('ZCARD', KEYS[2]), f(level)}
""")

# KEYS: slot sets.  ARGV: lease ms, 1 to re-add missing leases (else only extend), then one
# lease id per key.  Returns the positions (1-based) of the leases that were missing.
RENEW = Script(_NOW + """
local lease = tonumber(ARGV[1])
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[i + 2]) then
    redis.call('ZADD', key, now + lease, ARGV[i + 2])
  else
    table.insert(missing, i)
    if ARGV[2] == '1' then redis.call('ZADD', key, now + lease, ARGV[i + 2]) end
  end
  redis.call('PEXPIRE', key, math.ceil(lease * 2))
end
return missing
""")

# KEYS: cooldown key.  ARGV: ms.  A longer cooldown already set wins.
COOL = Script("""
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
""")

# KEYS: rotation counter.  ARGV: ttl ms.  Returns 0, 1, 2, ...
ROTATE = Script("""
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v - 1
""")


# ------------------------------------------------------------------ connection

def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            creds, host = netloc.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            netloc = f"{user}:***@{host}"
        elif "@" in netloc:          # redis://secret@host (a bare password)
            creds, host = netloc.rsplit("@", 1)
            netloc = f"***@{host}"
        query = parts.query
        if query:
            query = urlencode([(k, "***" if "pass" in k.lower() or "token" in k.lower() else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)])
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "(unparseable URL)"


def _secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if v and ("pass" in k.lower() or "token" in k.lower())]
    return found


def _errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError, asyncio.TimeoutError)


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
        if warn:
            log.warning("shared state: Redis at %s is unreachable (%s); limits, cooldowns, rotation and "
                        "usage totals continue in this process only until it answers again "
                        "(retried every %.0fs; this warning repeats at most once a minute)",
                        self.shown, self.reason(exc), self.probe)

    def ok(self) -> None:
        if self.down:
            with self.lock:
                was, self.down = self.down, False
            if was:
                log.warning("shared state: Redis at %s answers again; shared limits, cooldowns and "
                            "usage resumed", self.shown)


class Job:
    """A script for the background thread: a release, or a usage record."""

    __slots__ = ("script", "keys", "args", "kind", "deadline", "seq")

    def __init__(self, script: Script, keys: list[str], args: list[Any], kind: str,
                 deadline: float = math.inf) -> None:
        self.script, self.keys, self.args, self.kind = script, keys, args, kind
        self.deadline = deadline
        self.seq = 0


class Conn:
    """One Redis URL: a sync client, one asyncio client per event loop, health, background thread."""

    def __init__(self, url: str, *, lease: float = DEFAULT_LEASE, renew_every: float | None = None,
                 probe: float = 1.0, connect_timeout: float = 1.0, socket_timeout: float = 2.0,
                 max_connections: int = 64, place: str = "llm.shared_state") -> None:
        try:
            import redis
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
        # Our own rules decide what happens when Redis fails: no client-side retries.
        self._opts: dict[str, Any] = dict(decode_responses=True, socket_connect_timeout=connect_timeout,
                                          socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
        try:
            self.sync = redis.Redis.from_url(url, max_connections=max_connections, **self._opts)
        except ValueError as exc:
            raise ConfigError(f'{place}: "{self.shown}" is not a Redis URL ({self.health.reason(exc)}); '
                              "expected redis://host:port/db") from None
        self._aclients: dict[int, LoopClient] = {}
        self.worker = Worker(self)

    def check(self) -> None:
        """Start-up check: a clear ConfigError when Redis does not answer."""
        try:
            self.sync.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"
            if self.place == "llm.shared_state":
                fix = (f"correct the URL in llm.shared_state or ${REDIS_ENV}, or remove shared_state "
                       f"to keep limits and usage in this process only")
            else:
                fix = f"or correct the {self.place} URL"
            raise ConfigError(
                f"{self.place}: cannot reach Redis at {self.shown} ({self.health.reason(exc)}). "
                f"Start Redis there (for example: redis-server --port 6379), {fix}") from None

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
                _abandon(old.client)
        import redis.asyncio as aredis

        pool = aredis.BlockingConnectionPool.from_url(self.url, max_connections=self.max_connections,
                                                      timeout=30, **self._opts)
        entry = self._aclients[id(loop)] = LoopClient(loop, aredis.Redis(connection_pool=pool))
        return entry

    async def _await(self, futs: list[asyncio.Future[Any]]) -> list[Any]:
        try:
            results = [await f for f in futs]
        except _errors() as exc:
            self.health.failed(exc)
            raise RedisDown() from None
        self.health.ok()
        return results

    async def eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; RedisDown (after noting it) when Redis does not answer."""
        if not self.health.usable():
            raise RedisDown()
        return (await self._await([self._loop_client().submit(("eval", script, keys, args))]))[0]

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
                try:
                    await entry.client.aclose()
                except Exception:  # noqa: BLE001
                    pass
            else:
                _abandon(entry.client)
        await loop.run_in_executor(None, self.worker.flush, 5.0)

    # ---------------------------------------------------------- sync side

    def sync_call(self, fn: Callable[[Any], Any]) -> Any:
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


class LoopClient:
    """One event loop's client, sending what the loop asks for in one pipeline per loop iteration.

    Every request needs a few short Redis operations (cooldowns, the gate, the
    release, the usage record); those that many requests issue in the same
    iteration of the event loop go to Redis together, in one round trip, instead
    of one connection and round trip each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        self.loop = weakref.ref(loop)
        self.client = client
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def submit(self, op: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((op, fut))
        return fut

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        from redis.exceptions import NoScriptError

        try:
            results = await self._pipeline([op for op, _ in batch], use_sha=True)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:        # Redis does not know a script yet (or restarted): send its text
                again = await self._pipeline([batch[i][0] for i in missing], use_sha=False)
                for i, r in zip(missing, again):
                    results[i] = r
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                    else:
                        fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), result in zip(batch, results):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _pipeline(self, ops: list[tuple[Any, ...]], use_sha: bool) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for op in ops:
            if op[0] == "eval":
                _, script, keys, args = op
                if use_sha:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                else:
                    pipe.eval(script.src, len(keys), *keys, *args)
            else:
                pipe.execute_command(*op[1])
        return list(await pipe.execute(raise_on_error=False))


def _abandon(client: Any) -> None:
    """Drop the sockets of a client whose event loop has ended (it cannot be awaited any more)."""
    pool = getattr(client, "connection_pool", None)
    conns = list(getattr(pool, "_available_connections", []) or []) + \
        list(getattr(pool, "_in_use_connections", []) or [])
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


class Worker:
    """Background thread with a sync client: renews leases, retries releases, writes usage.

    It does what must not depend on an event loop: renewing this process's
    leases every ``renew_every`` seconds (so a busy or blocked loop cannot
    lose them), releases and usage records coming from finalisers or from a
    loop that is shutting down, and, after an outage, the usage recorded
    while Redis was away.  It stops after 30 s with nothing to do and starts
    again on demand.
    """

    IDLE_EXIT = 30.0
    BACKLOG = 100_000

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.q: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        self.leases: dict[str, str] = {}          # lease id -> slots key
        self.retry: list[Job] = []                # releases waiting for Redis to come back
        self.backlog: deque[Job] = deque(maxlen=self.BACKLOG)   # usage waiting for Redis
        self.seq_in = 0
        self.seq_done = 0
        self.sending = 0                          # usage records being written right now
        self._atexit = False

    # called from any thread

    def hold(self, lease: str, key: str) -> None:
        with self.cond:
            self._fork_check()
            self.leases[lease] = key
            self._ensure()

    def drop(self, lease: str) -> None:
        with self.cond:
            self.leases.pop(lease, None)

    def submit(self, job: Job) -> None:
        with self.cond:
            self._fork_check()
            if job.kind == "usage":
                self.seq_in += 1
                job.seq = self.seq_in
            self.q.put(job)
            self._ensure()

    def park(self, job: Job) -> None:
        """Keep a job for when Redis is back (usage: replayed; release: until its lease ends anyway)."""
        with self.cond:
            if job.kind == "usage":
                self.backlog.append(job)
            elif job.deadline > time.monotonic():
                self.retry.append(job)
            self._ensure()

    def drain(self, timeout: float) -> None:
        """Wait until the usage records submitted so far are written (or parked while Redis is down)."""
        end = time.monotonic() + timeout
        with self.cond:
            target = self.seq_in
            while self.seq_done < target or ((self.backlog or self.sending) and not self.conn.health.down):
                left = end - time.monotonic()
                if left <= 0 or self.thread is None:
                    return
                self.cond.wait(min(left, 0.05))

    def flush(self, timeout: float = 5.0) -> None:
        self.drain(timeout)

    def _fork_check(self) -> None:
        if self.pid != os.getpid():    # a forked child holds none of its parent's leases
            self.pid = os.getpid()
            self.thread = None
            self.leases.clear()
            self.retry.clear()
            self.backlog.clear()
            self.q = queue.SimpleQueue()

    def _ensure(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="xpl-redis", daemon=True)
            self.thread.start()
            if not self._atexit:
                self._atexit = True
                atexit.register(_flush_at_exit, weakref.ref(self))

    # the thread

    def _run(self) -> None:
        me = threading.current_thread()
        next_renew = time.monotonic() + self.conn.renew_every
        idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            wait = next_renew - now
            if self.retry or self.backlog:
                wait = min(wait, self.conn.health.probe / 2)
            jobs: list[Job] = []
            try:
                jobs.append(self.q.get(timeout=max(0.0, wait)))
                while len(jobs) < 1000:
                    jobs.append(self.q.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if now >= next_renew:
                self._renew()
                next_renew = now + self.conn.renew_every
            if jobs or self.retry or self.backlog:
                self._execute(jobs)
                idle_since = now
            elif self.leases:
                idle_since = now
            with self.cond:
                if self.thread is not me:
                    return
                if (not self.leases and not self.retry and not self.backlog and self.q.empty()
                        and now - idle_since > self.IDLE_EXIT):
                    self.thread = None
                    return

    def _renew(self) -> None:
        with self.cond:
            held = list(self.leases.items())
        if not held:
            return
        keys = [key for _, key in held]
        args = [int(self.conn.lease * 1000), 0, *(lease for lease, _ in held)]
        try:
            missing = self.conn.sync_call(lambda c: c.eval(RENEW.src, len(keys), *keys, *args))
        except RedisDown:
            return
        if not missing:
            return
        # A lease missing from Redis was either given back a moment ago (fine) or lost because
        # Redis restarted or was away longer than the lease: put back those still held, since
        # their calls really are in flight.
        with self.cond:
            lost = [held[i - 1] for i in missing if held[i - 1][0] in self.leases]
        if not lost:
            return
        keys = [key for _, key in lost]
        args = [int(self.conn.lease * 1000), 1, *(lease for lease, _ in lost)]
        try:
            self.conn.sync_call(lambda c: c.eval(RENEW.src, len(keys), *keys, *args))
        except RedisDown:
            return
        if lost:
            log.warning("shared state: %d concurrency lease(s) of this process had expired in Redis "
                        "(Redis restarted or was unreachable for longer than the %.1fs lease); "
                        "they were put back", len(lost), self.conn.lease)

    def _execute(self, jobs: list[Job]) -> None:
        with self.cond:
            now = time.monotonic()
            retry = [j for j in self.retry if j.deadline > now]
            backlog = list(self.backlog)
            self.retry, self.backlog = [], deque(maxlen=self.BACKLOG)
            batch = retry + backlog + jobs
            self.sending = sum(1 for j in batch if j.kind == "usage")
        ok = False
        if batch and self.conn.health.usable():
            try:
                def send(client: Any) -> list[Any]:
                    pipe = client.pipeline(transaction=False)
                    for job in batch:
                        pipe.eval(job.script.src, len(job.keys), *job.keys, *job.args)
                    return pipe.execute(raise_on_error=False)

                results = self.conn.sync_call(send)
                ok = True
                bad = [r for r in results if isinstance(r, Exception)]
                if bad:
                    log.warning("shared state: %d Redis script(s) failed: %s", len(bad), bad[0])
            except RedisDown:
                pass
        with self.cond:
            self.sending = 0
            if not ok:
                now = time.monotonic()
                self.retry.extend(j for j in batch if j.kind != "usage" and j.deadline > now)
                self.backlog.extend(j for j in batch if j.kind == "usage")
            seqs = [j.seq for j in jobs if j.seq]
            if seqs:
                self.seq_done = max(self.seq_done, max(seqs))
            self.cond.notify_all()


def _flush_at_exit(ref: weakref.ref[Worker]) -> None:
    worker = ref()
    if worker is not None:
        worker.flush(5.0)


# ------------------------------------------------------------------ the state

class Ticket(float):
    """What ``enter`` returns: the tokens taken, plus the lease to give back (None: local gate)."""

    __slots__ = ("lease",)

    def __new__(cls, taken: float, lease: str | None) -> Ticket:
        self = super().__new__(cls, taken)
        self.lease = lease
        return self


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class RedisGate:
    """A backend's limits held in Redis, with the interface of ``limits.Gate``.

    ``in_flight`` is the fleet-wide count from the last Redis answer (at least
    this process's own calls); ``queued`` counts this process's waiters.
    """

    def __init__(self, state: RedisState, backend: str, max_concurrent: int, tpm: int | None) -> None:
        self.state = state
        self.backend = backend
        self.limit = max_concurrent
        self.capacity = float(tpm) if tpm else 0.0
        self.rate_ms = self.capacity / 60_000.0
        self.keys = [state.key("bucket", backend), state.key("slots", backend)]
        self.local = state._local.gate(backend, max_concurrent, tpm)   # used while Redis is away
        self.queued = 0
        self.held = 0
        self.fleet = 0
        self.level = self.capacity
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._kick: asyncio.Future[None] | None = None
        self._id = uuid.uuid4().hex[:12]

    @property
    def in_flight(self) -> int:
        return max(self.held, self.fleet) + self.local.slots.in_use

    @property
    def load(self) -> float:
        return (self.in_flight + self.queued) / self.limit

    async def enter(self, tokens: int) -> Ticket:
        """Wait for a slot and the tokens (fleet-wide); returns a ticket for ``leave``."""
        self.queued += 1
        try:
            if self.state.conn.health.usable():
                try:
                    return await self._enter_shared(tokens)
                except RedisDown:
                    pass
            return Ticket(await self.local.enter(tokens), None)
        finally:
            self.queued -= 1

    async def _enter_shared(self, tokens: int) -> Ticket:
        amount = min(float(tokens), self.capacity) if self.capacity else 0.0
        loop = asyncio.get_running_loop()
        me: asyncio.Future[None] = loop.create_future()
        self._waiters.append(me)
        try:
            if self._waiters[0] is not me:
                await me                       # the waiter before us wakes us when it is done
            backoff = 0.002
            since = ""                          # server time of our first try, for the claim
            while True:
                if not self.state.conn.health.usable():
                    raise RedisDown()
                lease = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
                ok, count, level, wait_ms, since = await self._try_enter(amount, lease, since)
                self.fleet, self.level = count, level
                if ok:
                    self.held += 1
                    self.state.conn.worker.hold(lease, self.keys[1])
                    return Ticket(amount, lease)
                if wait_ms > 0:
                    nap = min(wait_ms / 1000.0, TOKEN_POLL_MAX)
                else:
                    nap, backoff = backoff, min(backoff * 2, self.state.poll_max)
                await self._nap(loop, nap * random.uniform(0.8, 1.2))
        finally:
            head = bool(self._waiters) and self._waiters[0] is me
            self._waiters.remove(me)
            if head and self._waiters:
                _wake(self._waiters[0])

    async def _try_enter(self, amount: float, lease: str, since: str) -> tuple[bool, int, float, float, str]:
        args = [repr(amount), repr(self.capacity), repr(self.rate_ms), self.limit,
                int(self.state.conn.lease * 1000), lease, self._id, CLAIM_TTL_MS, since]
        task = asyncio.ensure_future(self.state.conn.eval(ENTER, self.keys, args))
        try:
            res = await asyncio.shield(task)
        except asyncio.CancelledError:
            def undo(t: asyncio.Task[Any]) -> None:     # it went through after all: give it back
                if not t.cancelled() and t.exception() is None and int(t.result()[0]) == 1:
                    self.state.release_later(self, lease, amount)
            task.add_done_callback(undo)
            raise
        return int(res[0]) == 1, int(res[1]), float(res[2]), float(res[3]), str(res[4])

    async def _nap(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Sleep until it is time to ask Redis again, or until this process frees a slot."""
        fut: asyncio.Future[None] = loop.create_future()
        self._kick = fut
        handle = loop.call_later(seconds, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            if self._kick is fut:
                self._kick = None

    def kick(self) -> None:
        """Wake the waiting head of this process (after a slot or tokens came back)."""
        fut = self._kick
        if fut is None or fut.done():
            return
        try:
            fut_loop = fut.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is fut_loop:
                _wake(fut)
            elif not fut_loop.is_closed():
                fut_loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:
            pass

    def leave(self, taken: float, used: int) -> None:
        """Free the slot and settle the tokens; the Redis side runs in the background."""
        lease = getattr(taken, "lease", None)
        if lease is None:
            self.local.leave(float(taken), used)
            return
        self.state.conn.worker.drop(lease)
        self.held = max(0, self.held - 1)
        self.fleet = max(0, self.fleet - 1)
        self.state.release_later(self, lease, float(taken) - used if self.capacity else 0.0)


class RedisState:
    """The state interface of ``MemoryState``, shared through Redis by every process using it."""

    def __init__(self, url: str, prefix: str = "xpl", *, lease: float | None = None,
                 renew_every: float | None = None, probe_interval: float = 1.0,
                 poll_max: float = 0.05, check: bool = True) -> None:
        if lease is None:
            lease = _lease_from_env()
        self.prefix = prefix
        self.poll_max = poll_max
        self.conn = Conn(url, lease=lease, renew_every=renew_every, probe=probe_interval)
        if check:
            self.conn.check()
        self._local = MemoryState()
        self._gates: dict[str, RedisGate] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        from .redis_usage import RedisUsageStore

        self.usage = RedisUsageStore(url, prefix, conn=self.conn)

    def __repr__(self) -> str:
        return f"RedisState({self.conn.shown!r}, prefix={self.prefix!r})"

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def gate(self, backend: str, max_concurrent: int, tpm: int | None) -> RedisGate:
        gate = self._gates.get(backend)
        if gate is None:
            gate = self._gates[backend] = RedisGate(self, backend, max_concurrent, tpm)
        return gate

    def release_later(self, gate: RedisGate, lease: str, delta: float) -> None:
        """Give back a lease (and settle tokens) without blocking: on this loop, else in the thread."""
        args = [lease, repr(delta), repr(gate.capacity), repr(gate.rate_ms)]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            self.conn.worker.submit(Job(LEAVE, gate.keys, args, "release",
                                        time.monotonic() + self.conn.lease))
            gate.kick()
            return
        task = loop.create_task(self._release(gate, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, gate: RedisGate, args: list[Any]) -> None:
        job = Job(LEAVE, gate.keys, args, "release", time.monotonic() + self.conn.lease)
        try:
            res = await self.conn.eval(LEAVE, gate.keys, args)
            gate.fleet, gate.level = int(res[0]), float(res[1])
        except RedisDown:
            self.conn.worker.park(job)          # retried until the lease would have ended anyway
        except asyncio.CancelledError:          # the loop is shutting down: the thread does it
            self.conn.worker.submit(job)
            raise
        finally:
            gate.kick()

    async def cooldowns(self, backends: Iterable[str]) -> dict[str, float]:
        names = list(backends)
        out = await self._local.cooldowns(names)
        if not names:
            return out
        try:
            ttls = await self.conn.commands(*(("PTTL", self.key("cool", n)) for n in names))
        except RedisDown:
            return out
        for name, ttl in zip(names, ttls):
            if ttl is not None and int(ttl) > 0:
                out[name] = max(out.get(name, 0.0), int(ttl) / 1000.0)
        return out

    async def cool_down(self, backend: str, seconds: float) -> None:
        await self._local.cool_down(backend, seconds)
        ms = max(1, math.ceil(seconds * 1000))
        try:
            await self.conn.eval(COOL, [self.key("cool", backend)], [ms])
        except RedisDown:
            pass

    async def next_turn(self, model: str) -> int:
        try:
            return int(await self.conn.eval(ROTATE, [self.key("rr", model)], [ROTATION_TTL_MS]))
        except RedisDown:
            return await self._local.next_turn(model)

    async def close(self) -> None:
        """Close this loop's connections and write what usage is still queued."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.conn.aclose()


def _lease_from_env() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE
    try:
        value = float(raw)
        if value > 0:
            return value
    except ValueError:
        pass
    raise ConfigError(f'${LEASE_ENV}: expected a positive number of seconds, got "{raw}"')
