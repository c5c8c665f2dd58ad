"""Finding and reading the ``llm:`` block: the organism file, ``.env``, YAML (then ``validate.py``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..env import CONFIG_ENV
from ..errors import ConfigError
from .messages import show
from .resolved import RouterConfig
from .validate import validate_block

# ---------------------------------------------------------------- loading

def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> RouterConfig:
    """Load and validate the ``llm:`` block.

    ``source`` is a path to an organism file, the parsed dict of a whole
    organism file, just the ``llm:`` mapping, or None for ``$XML_PIPELINE_LLM_CONFIG``
    or ``./organism.yaml``.  ``.env`` (in the working directory and beside the
    file) is loaded first; real environment variables win.
    """
    if isinstance(source, Mapping):
        _load_dotenv(None)
        return validate_block(_llm_block(source, "the given mapping"), "<dict>", None)
    path = config_file(source)
    _load_dotenv(path.parent)
    return validate_block(_llm_block(_read_yaml(path), str(path)), str(path), path.parent)


def read_llm_block(source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The raw ``llm:`` mapping of an organism file, not validated (found as load_config finds it).

    For tools that adjust a block before validating it, such as
    ``xml-pipeline-llm complete --simulate`` pointing every backend at the simulator.
    """
    path = config_file(source)
    return dict(_llm_block(_read_yaml(path), str(path)))


def config_file(source: str | os.PathLike[str] | None = None) -> Path:
    """The organism file ``load_config`` reads: ``source``, else ``$XML_PIPELINE_LLM_CONFIG``, else ./organism.yaml."""
    if source is None:
        env = os.environ.get(CONFIG_ENV)
        source = env or "organism.yaml"
        if not env and not Path(source).exists():
            raise ConfigError(
                f"no organism.yaml in {Path.cwd()}: create one with an llm: block "
                f"(xml-pipeline-llm init writes a commented one), or set {CONFIG_ENV} to its path")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the path of an organism.yaml with an llm: block")
    return path


def _load_dotenv(directory: Path | None) -> None:
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    if directory is not None and directory.resolve() != Path.cwd().resolve():
        load_dotenv(directory / ".env", override=False)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}; "
                          f"check the indentation and quoting there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _llm_block(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with an llm: block, got {show(doc)}")
    if "llm" in doc:
        block = doc["llm"]
        if not isinstance(block, Mapping):
            raise ConfigError(f"llm: expected a mapping with backends:, got {show(block)}")
        return block
    if "backends" in doc:
        return doc
    raise ConfigError(f"{where}: no llm: block; add one with at least one backend "
                      f"(xml-pipeline-llm init writes a commented organism.yaml)")
