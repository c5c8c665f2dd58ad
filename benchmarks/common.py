"""Shared setup for the benchmarks: the simulator subprocess, routers, timing, tables.

The simulator always runs in its own process (``SimProcess``) so that its CPU
is not counted as the client's.  Variants that must not share a process (the
package registers a LiteLLM callback globally, which a "bare Router" baseline
must not pay for) run in worker processes (``Worker``, see ``_worker.py``);
the parent alternates their rounds so machine noise cancels.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# LiteLLM must never reach the network; a bare ``import litellm``
# without these fetches the cost map (with retries) before doing anything.
OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
           "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True", "LITELLM_TELEMETRY": "False"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

KEY_ENV = "BENCH_OPENAI_KEY"
FAKE_KEY = "sk-fake-bench-0000"
os.environ.setdefault(KEY_ENV, FAKE_KEY)

MODEL = "gpt-4o"                     # priced in LiteLLM's cost map: cost calculation runs
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "say hello to the benchmark please, in a few words"}]
CALL_KW: dict[str, Any] = {"max_tokens": 64}
NOT_BINDING = {"rate_limit_tpm": 10**9, "max_concurrent": 100_000}


# ------------------------------------------------------------------ simulator process

class SimProcess:
    """The provider simulator in a child process, scripted over a pipe (``_simserver.py``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._served_before_reset = 0

    def start(self) -> SimProcess:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_simserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(REPO), bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("simulator process did not start (see its stderr above)")
        self.port = json.loads(line)["port"]
        return self

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=10)
        except Exception:
            proc.terminate()
            proc.wait(timeout=5)

    def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if not reply["ok"]:
            raise RuntimeError(f"simulator: {reply['error']}")
        return reply["result"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, backend: str, fmt: str = "openai") -> str:
        root = f"{self.url}/b/{backend}"
        return f"{root}/v1" if fmt in ("openai", "xai") else root

    def stats(self, backend: str) -> dict[str, Any]:
        return self.call("stats", backend=backend)

    def total_stats(self) -> dict[str, Any]:
        return self.call("total_stats")

    def reset_stats(self, backend: str | None = None) -> None:
        if backend is None:
            self._served_before_reset += self.total_stats()["requests"]
        self.call("reset_stats", backend=backend)

    def requests_served(self) -> int:
        """Generation requests answered since start (across stat resets of all backends)."""
        return self._served_before_reset + self.total_stats()["requests"]

    def set_latency(self, backend: str, seconds: float) -> None:
        self.call("set_latency", backend=backend, seconds=seconds)

    def set_fault_rate(self, backend: str, rate: float, faults: list[dict[str, Any]], seed: int = 1) -> None:
        self.call("set_fault_rate", backend=backend, rate=rate, faults=faults, seed=seed)

    def script(self, backend: str, faults: list[dict[str, Any]]) -> None:
        self.call("script", backend=backend, faults=faults)

    def cpu_seconds(self) -> float:
        """User+system CPU the simulator process has used so far (Linux /proc)."""
        return proc_cpu_seconds(self.proc.pid) if self.proc else 0.0


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ------------------------------------------------------------------ routers and clients

def backend_entry(sim: SimProcess, name: str, **extra: Any) -> dict[str, Any]:
    """An ``openai`` backend (serves gpt-*) pointing at the simulator under ``/b/<name>``."""
    return {"provider": "openai", "name": name, "base_url": sim.base_url(name), "api_key_env": KEY_ENV,
            **extra}


def make_router(backends: list[dict[str, Any]], **llm: Any) -> Any:
    from xml_pipeline_llm import LLMRouter, load_config
    block = {"timeout": 60, **llm, "backends": backends}
    return LLMRouter(load_config({"llm": block}))


def quiet_litellm() -> Any:
    """Import LiteLLM (offline) with its per-call INFO logging silenced, as the package does."""
    import logging

    import litellm
    litellm.suppress_debug_info = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return litellm


def bare_router(api_base: str, **settings: Any) -> Any:
    """The "default bare Router": one deployment, LiteLLM's default settings."""
    litellm = quiet_litellm()
    return litellm.Router(model_list=[{"model_name": "m", "litellm_params": {
        "model": f"openai/{MODEL}", "api_base": api_base, "api_key": FAKE_KEY}}], **settings)


# ------------------------------------------------------------------ worker processes

class Worker:
    """Benchmark variants in their own process (``_worker.py``), driven over a pipe.

    ``variants`` maps a variant name to its spec (see ``_worker.py``); variants
    that may share a process (e.g. routers of different sizes) share one
    worker, so only one LiteLLM import is paid for them.
    """

    def __init__(self, sim_url: str, variants: dict[str, dict[str, Any]]) -> None:
        self.variants = variants
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_worker.py"),
                                      json.dumps({"sim": sim_url, "variants": variants})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(REPO), bufsize=1)
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {list(self.variants)} died (see its stderr above)")
        reply = json.loads(line)
        if not reply.get("ok", True):
            raise RuntimeError(f"worker {list(self.variants)}: {reply['error']}")
        return reply

    def call(self, variant: str, cmd: str, **args: Any) -> dict[str, Any]:
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "v": variant, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def handles(self) -> dict[str, Handle]:
        return {name: Handle(name, self) for name in self.variants}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.terminate()
                self.proc.wait(timeout=5)


class Handle:
    """One variant of a worker."""

    def __init__(self, name: str, worker: Worker) -> None:
        self.name, self.worker = name, worker

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.worker.call(self.name, cmd, **args)


class Workers:
    """Start worker processes ``parallel`` at a time (each imports LiteLLM: seconds of CPU)."""

    def __init__(self, sim_url: str, groups: list[dict[str, dict[str, Any]]], parallel: int = 2) -> None:
        self.workers: list[Worker] = []
        self.h: dict[str, Handle] = {}
        running: list[Worker] = []
        pending = list(groups)
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    w = Worker(sim_url, pending.pop(0))
                    self.workers.append(w)
                    running.append(w)
                running.pop(0).wait_ready()
        except BaseException:
            self.close()
            raise
        for w in self.workers:
            self.h.update(w.handles())

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self.workers:
            w.close()


def alternate(handles: Sequence[Handle], rounds: int, cmd: str, **args: Any) -> dict[str, list[dict[str, Any]]]:
    """Run ``cmd`` on every variant, ``rounds`` times, reversing the order every other round (ABBA)."""
    out: dict[str, list[dict[str, Any]]] = {h.name: [] for h in handles}
    for r in range(rounds):
        order = list(handles) if r % 2 == 0 else list(reversed(handles))
        for h in order:
            out[h.name].append(h.call(cmd, **args))
    return out


def med(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median over rounds of a/b, pairing the rounds (each pair ran back to back)."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b) if y[key])


def spread(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> str:
    """Range of the per-round ratios a/b (the noise the median ratio comes with)."""
    rs = sorted(x[key] / y[key] for x, y in zip(a, b) if y[key])
    return f"{rs[0]:.2f}-{rs[-1]:.2f}" if rs else "n/a"


# ------------------------------------------------------------------ output

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += ["", title]
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        lv = version("litellm")
    except Exception:
        lv = "?"
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"LiteLLM {lv}, {platform.system()} {platform.release()}")


def header(title: str) -> None:
    print(f"== {title}  ({time.strftime('%Y-%m-%d %H:%M')})", flush=True)
    print(f"machine: {machine()}", flush=True)


def rss_kb() -> int:
    return _status_kb("VmRSS")


def hwm_kb() -> int:
    return _status_kb("VmHWM")


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1
