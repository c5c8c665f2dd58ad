"""``python -m xml_pipeline_llm.simulator``: run the provider simulator in the foreground."""

from __future__ import annotations

import argparse
import sys

from .runner import run_foreground


def build_parser() -> argparse.ArgumentParser:
    """Kept separate so the package CLI can embed the same options."""
    parser = argparse.ArgumentParser(prog="python -m xml_pipeline_llm.simulator",
                                     description="Local OpenAI/xAI, Anthropic and Ollama wire-format simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: a free port)")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="share of requests (0..1) answered with a random fault (429/500/503/529/drop/malformed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added before every answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until interrupted."""
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.fault_rate <= 1.0:
        build_parser().error("--fault-rate must be within [0, 1]")
    return run_foreground(args.host, args.port, args.fault_rate, args.latency)


if __name__ == "__main__":
    sys.exit(main())
