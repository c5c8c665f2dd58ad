"""``xml-pipeline-llm top``: the swarm live in a terminal (rich's Live), refreshed every second.

Per agent (sorted by spend) requests, tokens and dollars per minute, total
spend and a budget bar; per backend calls in flight, queued, cooling down,
circuit; the budgets; the last errors.  From a gateway (``--url``), the fleet's
Redis or the SQLite ledger (``watch.py``).  ``q`` or Ctrl-C leaves, restoring
the terminal, with exit status 0.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..watch import WatchError, open_source
from .output import CLIError, make_console, make_table

if TYPE_CHECKING:
    from ..snapshot import Snapshot
    from ..watch import Source

SHOWN_ERRORS = 8
SHOWN_BUDGETS = 8


def cmd_top(args: argparse.Namespace) -> int:
    source = open_source(args.config, args.url, args.key)
    try:
        try:
            snap: Snapshot | None = source.read()
            problem = ""
        except WatchError as exc:
            if exc.fatal or args.once:
                raise CLIError(str(exc)) from None
            snap, problem = None, str(exc)
        console = make_console()
        if args.once:
            assert snap is not None
            console.print(render(snap, source.where, ""))
            return 0
        return _live(source, snap, problem, args.interval)
    finally:
        source.close()


def _live(source: Source, snap: Snapshot | None, problem: str, interval: float) -> int:
    from rich.live import Live


    console = make_console()
    try:
        with _keys() as pressed, Live(render(snap, source.where, problem), console=console, screen=console.is_terminal,
                                      auto_refresh=False, transient=False) as live:
            while True:
                deadline = time.monotonic() + interval
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if pressed(left) in ("q", "Q"):
                        return 0
                try:
                    snap, problem = source.read(), ""
                except WatchError as exc:
                    if exc.fatal:
                        raise CLIError(str(exc)) from None
                    problem = str(exc)
                live.update(render(snap, source.where, problem), refresh=True)
    except KeyboardInterrupt:
        return 0


@contextmanager
def _keys() -> Iterator[Any]:
    """A function waiting up to N seconds for a key (None: none); the terminal in cbreak mode meanwhile."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        def sleep(seconds: float) -> str | None:
            time.sleep(seconds)
            return None

        yield sleep
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)          # keys one at a time, no echo; Ctrl-C still interrupts

    def read(seconds: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], seconds)
        if not ready:
            return None
        return os.read(fd, 32).decode("utf-8", "replace")[:1] or None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# ------------------------------------------------------------------ the screen

def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.6f}" if value < 0.01 else f"{value:.4f}"


def _bar(percent: float | None, width: int = 10) -> Any:
    from rich.text import Text

    if percent is None:
        return Text("-")
    filled = min(width, int(round(width * min(percent, 100.0) / 100.0)))
    style = "red" if percent >= 95 else "yellow" if percent >= 75 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"), f" {percent:5.1f}%")


def render(snap: Snapshot | None, where: str, problem: str) -> Any:
    """The whole screen for one snapshot (None: nothing read yet)."""
    from rich.console import Group
    from rich.text import Text

    head = Text.assemble(("xml-pipeline-llm top", "bold"), f"  {where}  ",
                         (datetime.now().strftime("%H:%M:%S") if snap is None else
                          datetime.fromtimestamp(snap.taken_at).strftime("%H:%M:%S"), "dim"),
                         ("   q: quit", "dim"))
    parts: list[Any] = [head]
    if problem:
        parts.append(Text(problem + " (retrying)", style="bold red"))
    if snap is None:
        return Group(*parts)
    if snap.empty:
        parts.append(Text(f"No calls recorded yet in {where}: waiting for the first ones.", style="yellow"))
    parts += [_agents(snap), _backends(snap)]
    if snap.budgets:
        parts.append(_budgets(snap))
    if snap.errors:
        parts.append(_errors(snap))
    parts += [Text(note, style="dim") for note in snap.notes]
    return Group(*parts)


def _table(title: str, columns: Iterable[tuple[str, str]]) -> Any:
    table = make_table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


def _agents(snap: Snapshot) -> Any:
    agents = _table("Agents (by spend; per minute: the last 60 s)", (
        ("agent", "left"), ("req/min", "right"), ("tok/min", "right"), ("$/min", "right"),
        ("spend $", "right"), ("requests", "right"), ("errors", "right"), ("budget", "left")))
    for a in snap.agents:
        agents.add_row(a.agent, f"{a.requests_per_min:,}", f"{a.tokens_per_min:,}", _usd(a.usd_per_min),
                       _usd(a.spend_usd), f"{a.requests:,}", f"{a.errors:,}", _bar(a.budget_percent))
    return agents


def _backends(snap: Snapshot) -> Any:
    from rich.text import Text

    backends = _table("Backends", (
        ("backend", "left"), ("provider", "left"), ("in flight", "right"), ("queued", "right"),
        ("cooling", "right"), ("circuit", "left"), ("tries/min", "right"), ("err/min", "right"),
        ("tok/min", "right"), ("spend $", "right")))
    for b in snap.backends:
        flight = "-" if b.in_flight is None else f"{b.in_flight}" + (f"/{b.max_concurrent}" if b.max_concurrent else "")
        cooling = Text(f"{b.cooling_down:.1f}s", style="bold red") if b.cooling_down > 0 else Text("-")
        circuit = Text(b.circuit, style="" if b.circuit == "closed" else "bold red")
        backends.add_row(b.backend, b.provider, flight, "-" if b.queued is None else str(b.queued), cooling, circuit,
                         f"{b.requests_per_min:,}", Text(f"{b.errors_per_min:,}", style="red" if b.errors_per_min
                                                         else ""), f"{b.tokens_per_min:,}", _usd(b.spend_usd))
    return backends


def _budgets(snap: Snapshot) -> Any:
    budgets = _table("Budgets", ((name, "left") for name in ("scope", "key", "used", "tokens", "dollars", "window")))
    for s in snap.budgets[:SHOWN_BUDGETS]:
        budgets.add_row(s.scope, s.key or "-", _bar(s.percent),
                        "-" if s.limit_tokens is None else f"{s.used_tokens:,} / {s.limit_tokens:,}",
                        "-" if s.limit_usd is None else f"${s.used_usd:.4f} / ${s.limit_usd:g}", s.window)
    return budgets


def _errors(snap: Snapshot) -> Any:
    from rich.text import Text

    errors = _table("Last errors", ((name, "left") for name in ("time", "agent", "backend", "model", "outcome")))
    for e in snap.errors[:SHOWN_ERRORS]:
        errors.add_row(datetime.fromtimestamp(e.time).strftime("%H:%M:%S"), e.agent, e.backend, e.model,
                       Text(e.outcome, style="red" if e.outcome.startswith("error:") else "yellow"))
    return errors


__all__ = ["cmd_top", "render", "CLIError"]
