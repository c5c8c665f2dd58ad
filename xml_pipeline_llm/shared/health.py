"""Whether Redis is there: ``RedisDown``, which errors mean "not reachable", and ``Health``.

``Health`` notes each failure once (a warning naming the URL without its password)
and when Redis is back; the callers fall back to this process's own state meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

log = logging.getLogger("xml_pipeline_llm")


class RedisDown(Exception):
    """Redis did not answer; the caller falls back to local state."""


def redis_errors() -> tuple[type[BaseException], ...]:
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


