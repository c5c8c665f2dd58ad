"""``xml-pipeline-llm simulate``: the provider simulator in the foreground."""

from __future__ import annotations

import argparse

from ..simulator import run_foreground
from .output import print_error


def cmd_simulate(args: argparse.Namespace) -> int:
    def out(line: str) -> None:
        if line.startswith("provider simulator cannot listen"):
            print_error(line[len("provider simulator "):] + "; choose another --port (0 picks a free one)")
        else:
            print(line, flush=True)

    out(f"starting the provider simulator (fault rate {args.fault_rate:g}, latency {args.latency:g}s); "
        f"Ctrl-C stops it")
    return run_foreground(args.host, args.port, args.fault_rate, args.latency, out=out)
