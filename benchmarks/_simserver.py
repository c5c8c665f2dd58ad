"""The provider simulator in its own process, scripted over stdin/stdout (JSON lines).

Started by ``common.SimProcess``; not meant to be run by hand.  The benchmarks
keep the simulator out of the measured process so that its CPU is not counted
as the router's.  The simulator has no HTTP control endpoint, so this wrapper
offers one over the pipe: each stdin line is ``{"cmd": ..., ...}`` and gets one
stdout line back (``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``).

Commands: ``script``, ``set_fault_rate``, ``set_latency``, ``reset``,
``reset_stats``, ``stats``, ``total_stats``, ``quit``.  Faults are given as
dicts of ``Fault`` fields, e.g. ``{"kind": "status", "code": 503}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from xml_pipeline_llm.simulator import Fault, run_simulator


def _stats(st: object) -> dict:
    out = dataclasses.asdict(st)  # type: ignore[call-overload]
    out.pop("last_request", None)
    return out


def _faults(specs: list[dict]) -> list[Fault]:
    return [Fault(**spec) for spec in specs]


def main() -> int:
    with run_simulator("127.0.0.1", 0) as sim:
        print(json.dumps({"port": sim.port}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                cmd = msg.pop("cmd")
                result = None
                if cmd == "quit":
                    print(json.dumps({"ok": True, "result": None}), flush=True)
                    break
                if cmd == "script":
                    sim.script(msg["backend"], _faults(msg["faults"]))
                elif cmd == "set_fault_rate":
                    sim.set_fault_rate(msg["backend"], msg["rate"], _faults(msg["faults"]), msg.get("seed"))
                elif cmd == "set_latency":
                    sim.set_latency(msg["backend"], msg["seconds"], msg.get("per_chunk", 0.0))
                elif cmd == "reset":
                    sim.reset(msg.get("backend"))
                elif cmd == "reset_stats":
                    sim.reset_stats(msg.get("backend"))
                elif cmd == "stats":
                    result = _stats(sim.stats(msg["backend"]))
                elif cmd == "total_stats":
                    result = _stats(sim.total_stats())
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                print(json.dumps({"ok": True, "result": result}), flush=True)
            except Exception as exc:  # report, keep serving
                print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
