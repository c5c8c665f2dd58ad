"""``xml-pipeline-llm serve``: the router behind an OpenAI-compatible HTTP endpoint (docs/gateway.md)."""

from __future__ import annotations

import argparse

from ..config import load_config
from ..gateway.server import serve


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return serve(config, host=args.host, port=args.port, workers=args.workers, grace=args.grace)
