"""How the command line talks: one error line, tables in one style, colour only on a terminal."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, ConfigError

if TYPE_CHECKING:
    from rich.console import Console


class CLIError(Exception):
    """A user mistake the command line itself detects; the message is the whole story."""


def terminal_columns() -> int:
    try:
        return max(60, os.get_terminal_size().columns)
    except OSError:
        return 80


def describe(exc: BaseException) -> str:
    """The message for an error: our own errors are already user-ready."""
    if isinstance(exc, (CLIError, ConfigError, BackendError)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split()) or "no details"
    return f"unexpected {type(exc).__name__}: {text} (run with --debug for the traceback)"


def print_error(message: str) -> None:
    from rich.text import Text

    console = make_console(stderr=True)
    for line in message.splitlines() or [""]:
        console.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


def setup_logging(debug: bool, verbose: bool) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(debug))  # type: ignore[arg-type]
    handler._xpl_cli = True  # type: ignore[attr-defined]
    log = logging.getLogger("xml_pipeline_llm")
    for old in [h for h in log.handlers if getattr(h, "_xpl_cli", False)]:
        log.removeHandler(old)   # main() called again in one process
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    log.propagate = False


class _LogFormatter:
    """``warning: ...`` lines (with the logger name and time under --debug)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug

    def format(self, record: Any) -> str:
        text = record.getMessage()
        level = record.levelname.lower()
        if self.debug:
            text = f"{time.strftime('%H:%M:%S')} {record.name} {level}: {text}"
            if record.exc_info:
                import logging

                text += "\n" + logging.Formatter().formatException(record.exc_info)
            return text
        return f"{level}: {text}"


def make_table(title: str | None = None, footer: bool = False) -> Any:
    """The package's table style: no outer frame, a rule under the header (and above a footer)."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold",
                 footer_style="bold", show_footer=footer, title=title, title_justify="left",
                 title_style="bold")


def show(console: Console, renderable: Any) -> None:
    """Print a table; piped, without the trailing blanks rich pads cells with."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()


def make_console(stderr: bool = False) -> Console:
    """A rich console: colour only on a terminal (and never with NO_COLOR), 80 columns when piped."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, emoji=False)


def cost_text(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.6f}"


def num(value: float) -> str:
    return f"{value:g}"


def when_text(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
