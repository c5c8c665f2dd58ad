"""``xml-pipeline-llm init``: a commented organism.yaml and a .env template in the working directory.

The organism.yaml is the example shipped inside the package
(``xml_pipeline_llm/data/organism.example.yaml``); the .env lists the key
variables it names, empty.  Neither file is overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .output import CLIError

EXAMPLE = "organism.example.yaml"
DASHBOARD = "grafana-dashboard.json"

_KEY_VAR = re.compile(r"^(\s*#)?\s*(?:-\s+)?api_key_env:\s*([A-Z][A-Z0-9_]*_API_KEY)\b", re.M)

ENV_HEADER = """\
# Keys of the backends in organism.yaml: xml-pipeline-llm reads this file at start-up
# (variables already set in the environment win). Fill in the keys you have, and delete from
# organism.yaml the backends you have none for (or set llm.missing_keys: skip there).
# Keep this file out of version control.
"""


def packaged(name: str) -> str:
    """The text of a file shipped in ``xml_pipeline_llm/data/``."""
    from importlib.resources import files

    return files("xml_pipeline_llm").joinpath("data", name).read_text(encoding="utf-8")


def env_template(example: str) -> str:
    """A .env naming the ``*_API_KEY`` variables of ``example``: empty, those of commented-out backends commented."""
    active: dict[str, None] = {}
    commented: dict[str, None] = {}
    for match in _KEY_VAR.finditer(example):
        (commented if match.group(1) else active)[match.group(2)] = None
    lines = [f"{var}=" for var in active] + [f"# {var}=" for var in commented if var not in active]
    return ENV_HEADER + "\n".join(lines) + "\n"


def cmd_init(args: argparse.Namespace) -> int:
    example = packaged(EXAMPLE)
    files: list[tuple[Path, str, str]] = [
        (Path("organism.yaml"), example, "the llm: block, every key commented"),
        (Path(".env"), env_template(example), "the key variables it names, empty"),
    ]
    if args.dashboard:
        files.append((Path(DASHBOARD), packaged(DASHBOARD), "import it in Grafana (Prometheus data source)"))
    present = [str(path) for path, _, _ in files if path.exists()]
    if present and not args.force:
        raise CLIError(f"{' and '.join(present)} already exist{'s' if len(present) == 1 else ''} in "
                       f"{Path.cwd()}; nothing was written. Run init --force to overwrite, or edit "
                       f"{'it' if len(present) == 1 else 'them'}")
    for path, text, _ in files:
        _write(path, text, private=path.name == ".env")
    for path, _, what in files:
        print(f"wrote {path} ({what})")
    print("next:\n"
          "  1. put your keys in .env; remove from organism.yaml the backends without one\n"
          "  2. xml-pipeline-llm check     # validates it, prints the routing table\n"
          '  3. xml-pipeline-llm complete -m grok-4.1 "Say hello"\n'
          'offline, no keys: xml-pipeline-llm complete --simulate -m grok-4.1 "Say hello"')
    return 0


def _write(path: Path, text: str, private: bool) -> None:
    """Write ``text`` to ``path``; a .env is readable by its owner only (keys go there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    if private:
        os.chmod(path, 0o600)        # also when --force replaces a file made with wider rights
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
