"""The background thread of a Redis connection: lease renewal, late releases, usage writes.

What it does must not depend on an event loop being alive or responsive.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from .health import RedisDown, unreachable
from .scripts import RENEW, Script

if TYPE_CHECKING:
    from .connection import Conn

log = logging.getLogger("xml_pipeline_llm")


class Job:
    """A script for the background thread: a release, or a usage record."""

    __slots__ = ("script", "keys", "args", "kind", "deadline", "seq")

    def __init__(self, script: Script, keys: list[str], args: list[Any], kind: str,
                 deadline: float = math.inf) -> None:
        self.script, self.keys, self.args, self.kind = script, keys, args, kind
        self.deadline = deadline
        self.seq = 0


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
        self.q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()    # None: only wakes the thread
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
            idle = not self.backlog and not self.retry
            if job.kind == "usage":
                self.backlog.append(job)
            elif job.deadline > time.monotonic():
                self.retry.append(job)
            if idle:            # from now on the thread retries every probe / 2 seconds
                self._wake()

    def _wake(self) -> None:
        """Have the thread look at its backlog now (it may be asleep until the next lease renewal)."""
        self.q.put(None)
        self._ensure()

    def drain(self, timeout: float) -> None:
        """Wait until the usage records submitted so far are written (or parked while Redis is down)."""
        end = time.monotonic() + timeout
        with self.cond:
            target = self.seq_in
            if self.backlog and self.conn.health.usable():
                self._wake()            # replay what Redis missed now, not at the thread's next round
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
            got: list[Job | None] = []
            try:
                got.append(self.q.get(timeout=max(0.0, wait)))
                while len(got) < 1000:
                    got.append(self.q.get_nowait())
            except queue.Empty:
                pass
            jobs = [job for job in got if job is not None]
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
        try:
            missing = self._renew_leases(held, readd=False)
        except RedisDown:
            return
        if not missing:
            return
        # A lease missing from Redis was either given back a moment ago (fine) or lost because
        # Redis restarted or was away longer than the lease: put back those still held, since
        # their calls really are in flight.
        with self.cond:
            lost = [pair for pair in missing if pair[0] in self.leases]
        if not lost:
            return
        try:
            self._renew_leases(lost, readd=True)
        except RedisDown:
            return
        log.warning("shared state: %d concurrency lease(s) of this process had expired in Redis "
                    "(Redis restarted or was unreachable for longer than the %.1fs lease); "
                    "they were put back", len(lost), self.conn.lease)

    def _renew_leases(self, held: list[tuple[str, str]], readd: bool) -> list[tuple[str, str]]:
        """Extend (or put back) leases: one RENEW per backend, since each has its own cluster slot.

        Returns the (lease, key) pairs that were missing in Redis.
        """
        by_key: dict[str, list[str]] = {}
        for lease, key in held:
            by_key.setdefault(key, []).append(lease)
        calls = [(RENEW, [key] * len(leases), [int(self.conn.lease * 1000), int(readd), *leases])
                 for key, leases in by_key.items()]
        results = self.conn.sync_scripts(calls)
        missing: list[tuple[str, str]] = []
        for (_, keys, args), result in zip(calls, results):
            if isinstance(result, Exception):    # that node is away: tried again next round
                continue
            missing += [(args[i + 1], keys[0]) for i in result]
        return missing

    def _execute(self, jobs: list[Job]) -> None:
        batch = self._take_batch(jobs)
        again = batch
        if batch and self.conn.health.usable():
            try:
                again = self._send(batch)
            except RedisDown:
                pass
        self._done(jobs, again)

    def _take_batch(self, jobs: list[Job]) -> list[Job]:
        """The new jobs, with the releases and usage kept while Redis was away."""
        with self.cond:
            now = time.monotonic()
            retry = [j for j in self.retry if j.deadline > now]
            backlog = list(self.backlog)
            self.retry, self.backlog = [], deque(maxlen=self.BACKLOG)
            batch = retry + backlog + jobs
            self.sending = sum(1 for j in batch if j.kind == "usage")
        return batch

    def _send(self, batch: list[Job]) -> list[Job]:
        """Run the batch; the jobs to try again (those of a cluster node that was away)."""
        results = self.conn.sync_scripts([(j.script, j.keys, j.args) for j in batch])
        # on a cluster a node may be away while the others took their scripts: only
        # the jobs of that node are kept for later (the others must not run twice)
        again = [j for j, r in zip(batch, results) if isinstance(r, Exception) and unreachable(r)]
        bad = [r for r in results if isinstance(r, Exception) and not unreachable(r)]
        if bad:
            log.warning("shared state: %d Redis script(s) failed: %s", len(bad), bad[0])
        return again

    def _done(self, jobs: list[Job], again: list[Job]) -> None:
        with self.cond:
            self.sending = 0
            if again:
                now = time.monotonic()
                self.retry.extend(j for j in again if j.kind != "usage" and j.deadline > now)
                self.backlog.extend(j for j in again if j.kind == "usage")
            seqs = [j.seq for j in jobs if j.seq]
            if seqs:
                self.seq_done = max(self.seq_done, max(seqs))
            self.cond.notify_all()


def _flush_at_exit(ref: weakref.ref[Worker]) -> None:
    worker = ref()
    if worker is not None:
        worker.flush(5.0)
