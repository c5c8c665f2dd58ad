"""Shared state beyond one Redis server: a Redis Cluster, and TLS (``rediss://``).

The session starts its own servers on 127.0.0.1, as test_redis.py does: a
3-master cluster (``redis-server --cluster-enabled yes`` x3, then ``redis-cli
--cluster create``), and for TLS a throw-away CA and server certificate made
with the openssl CLI (the SAN is IP:127.0.0.1, so the certificate is really
verified), a TLS server and a TLS cluster.  The multi-process tests of
test_redis.py run unchanged on the cluster.  No log record above DEBUG, no
worker's stderr and no exception may mention CROSSSLOT, MOVED or ASK: every
script's keys share one hash tag, and redis-py's cluster client follows
redirections itself.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from conftest import MESSAGES, backend
from test_redis import (
    REDIS_SERVER,
    Fleet,
    RedisServer,
    _free_port,
    fleet_holds_max_concurrent_and_one_token_bucket,
    fleet_usage_totals_are_exact,
    llm_block,
    prefix,
    shared_router,
)

from xml_pipeline_llm import ConfigError, load_config
from xml_pipeline_llm.simulator import Fault

REDIS_CLI = shutil.which("redis-cli")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                reason="redis-server is not installed (apt-get install redis-server; "
                                "CI's .ci/run does this)")
REDIRECTS = re.compile(r"\b(CROSSSLOT|MOVED|ASK)\b")
CLI = [sys.executable, "-m", "xml_pipeline_llm.cli"]


# ------------------------------------------------------------------ servers

def _need(tool: str | None, name: str) -> str:
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI=true but {name} is not installed (it comes with redis-server / openssl)")
        pytest.skip(f"{name} is not installed")
    return tool


class Tls:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""

    def __init__(self, where: Path) -> None:
        openssl = _need(OPENSSL, "openssl")
        where.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = where / "ca.pem", where / "server.pem", where / "server.key"
        ca_key, csr, ext = where / "ca.key", where / "server.csr", where / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in ([openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", self.ca, "-days", "2",
                     "-subj", "/CN=xml-pipeline-llm test CA"],
                    [openssl, "req", *ec, "-keyout", self.key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                    [openssl, "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
                     "-out", self.cert, "-days", "2", "-extfile", ext]):
            subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=30)
        self.key.chmod(0o600)

    def server_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]

    def query(self) -> str:
        return f"?ssl_ca_certs={self.ca}"

    def client_opts(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}


class Node:
    """One redis-server process on 127.0.0.1 that can be killed and started again on its port."""

    def __init__(self, args: list[str], port: int, tls: Tls | None, password: str | None = None) -> None:
        self.args, self.port, self.tls, self.password = args, port, tls, password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        assert REDIS_SERVER is not None
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      *auth, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except Exception:  # noqa: BLE001 - not up yet
                assert self.proc.poll() is None, f"redis-server on port {self.port} exited"
                assert time.monotonic() < deadline, f"redis-server did not start on port {self.port}"
                time.sleep(0.05)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=2,
                           **(self.tls.client_opts() if self.tls else {}))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random
    import socket

    while True:
        port = random.randrange(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class Cluster:
    """Three masters on 127.0.0.1 (no replicas, no persistence), made with redis-cli --cluster create."""

    def __init__(self, where: Path, tls: Tls | None = None, count: int = 3) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.nodes = []
        for _ in range(count):
            port = _node_port()
            args = ["--cluster-enabled", "yes", "--cluster-config-file", str(where / f"nodes-{port}.conf"),
                    "--dir", str(where)]
            args += [*tls.server_args(port), "--tls-cluster", "yes"] if tls else ["--port", str(port)]
            self.nodes.append(Node(args, port, tls))

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss+cluster://127.0.0.1:{self.nodes[0].port}{self.tls.query()}"
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> Cluster:
        cli = _need(REDIS_CLI, "redis-cli")
        for node in self.nodes:
            node.start()
        tls = ["--tls", "--cacert", str(self.tls.ca)] if self.tls else []
        subprocess.run([cli, *tls, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok and knows all slots."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [n.client().cluster("info") for n in self.nodes]
                if all(i.get("cluster_state") == "ok" and int(i.get("cluster_slots_ok", 0)) == 16384
                       for i in infos):
                    return
            except Exception:  # noqa: BLE001 - a node still starting
                pass
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.1)

    def client(self) -> Any:
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True,
                            **(self.tls.client_opts() if self.tls else {}))

    def node_of(self, key: str) -> Node:
        name = self.client().get_node_from_key(key).name
        return next(n for n in self.nodes if name.endswith(f":{n.port}"))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return Tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if REDIS_SERVER is None:
        pytest.fail("CI=true but redis-server is not installed: .ci/run must apt-get install redis-server")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module", autouse=True)
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path]]:
    """Four worker processes (as in test_redis.py), their stderr kept in a file to be read.

    Started first, so that their import of LiteLLM overlaps the tests in this process.
    """
    log = tmp_path_factory.mktemp("fleet") / "stderr.txt"
    with open(log, "wb") as err:
        f = Fleet(4, stderr=err)
        try:
            yield f, log
        finally:
            f.close()


def no_redirects(caplog: pytest.LogCaptureFixture) -> None:
    """No log record above DEBUG (message or traceback) names a cluster redirection or CROSSSLOT."""
    bad = [r for r in caplog.records if r.levelno > logging.DEBUG
           and REDIRECTS.search(r.getMessage() + (r.exc_text or ""))]
    assert not bad, [r.getMessage() for r in bad]


def usage_cli(tmp_path: Path, url: str, p: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XML_PIPELINE_LLM_CONFIG"}
    return subprocess.run([*CLI, "usage", "--store", url, "--redis-prefix", p, *args], cwd=tmp_path,
                          env={**env, "COLUMNS": "120"}, capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------ configuration

def test_the_new_schemes_are_accepted_and_others_are_a_clear_error():
    for url in ("rediss://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1", "rediss+cluster://127.0.0.1:1"):
        assert load_config({"llm": {"backends": [{"provider": "ollama"}], "shared_state": url}}).shared_state == url
    with pytest.raises(ConfigError) as err:
        load_config({"llm": {"backends": [{"provider": "ollama"}], "shared_state": "cluster://:pw@h:1"}})
    text = str(err.value)
    assert "llm.shared_state" in text and "redis+cluster://host:port" in text and "rediss://" in text
    assert "pw" not in text
    with pytest.raises(ConfigError, match=r"llm\.redis_prefix: .*hash tags"):
        load_config({"llm": {"backends": [{"provider": "ollama"}], "redis_prefix": "a{b}"}})


def test_cluster_url_mistakes_are_config_errors(cluster):
    from xml_pipeline_llm.shared.state import RedisState

    with pytest.raises(ConfigError, match="only database 0"):
        RedisState(cluster.url + "/2", "x")
    single = f"redis://127.0.0.1:{cluster.nodes[0].port}/0"       # a cluster node named as one server
    with pytest.raises(ConfigError, match=r"node of a Redis Cluster; use redis\+cluster://127\.0\.0\.1:"):
        RedisState(single, "x")
    with pytest.raises(ConfigError) as err:                        # nothing there
        RedisState(f"redis+cluster://:secret-pw@127.0.0.1:{_free_port()}", "x")
    assert "cannot reach Redis" in str(err.value) and "secret-pw" not in str(err.value)
    server = RedisServer().start()                                 # one server named as a cluster
    try:
        with pytest.raises(ConfigError) as err:
            RedisState(f"redis+cluster://127.0.0.1:{server.port}", "x")
        assert "use redis:// for a single server" in str(err.value), str(err.value)
    finally:
        server.stop()


# ------------------------------------------------------------------ TLS

@pytest.fixture(scope="module")
def tls_server(tls: Tls) -> Iterator[Node]:
    _need(REDIS_SERVER, "redis-server")
    port = _free_port()
    node = Node(tls.server_args(port), port, tls, password="tls-pw-not-shown")
    yield node.start()
    node.stop()


def test_tls_router_calls_usage_and_cli(sim, tls, tls_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"rediss://:tls-pw-not-shown@127.0.0.1:{tls_server.port}/0{tls.query()}"
    p = prefix()
    r = shared_router(url, p, [backend(sim, "xai", "rdx-tls-a", max_concurrent=3, rate_limit_tpm=100_000)])

    async def calls() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(
            *(r.complete("grok-4.1", MESSAGES, agent_id=f"tls{i % 2}") for i in range(8))), 30)

    out = asyncio.run(calls())
    assert len(out) == 8
    assert r.get_agent_usage("tls0").request_count == 4 and r.get_agent_usage("tls1").request_count == 4
    db = tls_server.client()
    assert db.hget(f"{p}:usage:{{{p}}}:agent:tls0", "request_count") == "4"     # really in that Redis
    assert db.exists(f"{p}:{{rdx-tls-a}}:bucket")
    total = sum(o.usage["total_tokens"] for o in out)
    shown = usage_cli(tmp_path, url, p, "--by", "backend", "--csv", "-")
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(shown.stdout.splitlines()))
    assert [(x["backend"], x["request_count"], int(x["total_tokens"])) for x in rows] == [("rdx-tls-a", "8", total)]
    asyncio.run(r.aclose())
    assert not any("tls-pw-not-shown" in rec.getMessage() for rec in caplog.records)
    assert not any(rec.levelno >= logging.WARNING for rec in caplog.records          # (the price warning
                   if rec.name.startswith("xml_pipeline_llm")                     # comes once a process)
                   and not rec.getMessage().startswith("no price for")), caplog.text


def test_tls_verifies_the_certificate(tls, tls_server, tmp_path):
    from xml_pipeline_llm.shared.state import RedisState

    url = f"rediss://:tls-pw-not-shown@127.0.0.1:{tls_server.port}/0"       # no CA given: not trusted
    with pytest.raises(ConfigError) as err:
        RedisState(url, "x")
    text = str(err.value)
    assert "CERTIFICATE_VERIFY_FAILED" in text and "tls-pw-not-shown" not in text and "***" in text
    shown = usage_cli(tmp_path, url, "x")
    assert shown.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in shown.stderr
    assert "tls-pw-not-shown" not in shown.stderr + shown.stdout and "Traceback" not in shown.stderr


def test_tls_cluster(sim, tls, tmp_path_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    tc = Cluster(tmp_path_factory.mktemp("tls-cluster"), tls=tls).start()
    try:
        p = prefix()
        names = ["rdx-tc-a", "rdx-tc-b", "rdx-tc-c"]
        r = shared_router(tc.url, p, [backend(sim, "xai", n, max_concurrent=2, rate_limit_tpm=100_000)
                                      for n in names], strategy="round-robin")

        async def calls() -> list[Any]:
            return await asyncio.wait_for(asyncio.gather(
                *(r.complete("grok-4.1", MESSAGES, agent_id="tc") for _ in range(9))), 30)

        out = asyncio.run(calls()) + asyncio.run(calls())      # a new loop: a new client follows
        assert sorted(o.backend for o in out) == sorted(names * 6)
        assert r.get_agent_usage("tc").request_count == 18
        db = tc.client()
        assert all(db.exists(f"{p}:{{{n}}}:bucket") for n in names)
        shown = usage_cli(tmp_path, tc.url, p, "--by", "agent", "--csv", "-")
        assert shown.returncode == 0, shown.stderr
        assert [(x["agent_id"], x["request_count"]) for x in csv.DictReader(shown.stdout.splitlines())] == \
            [("tc", "18")]
        asyncio.run(r.aclose())
        no_redirects(caplog)
        assert not any(rec.levelno >= logging.WARNING for rec in caplog.records      # (the price warning
                       if rec.name.startswith("xml_pipeline_llm")                 # comes once a process)
                       and not rec.getMessage().startswith("no price for")), caplog.text
    finally:
        tc.stop()


# ------------------------------------------------------------------ cluster, in one process

async def test_every_script_keeps_to_one_slot_and_everything_is_shared(sim, cluster, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    p = prefix()
    names = [f"rdx-cl-{c}" for c in "abcdef"]
    db = cluster.client()
    assert len({cluster.node_of(f"{{{n}}}").port for n in names}) >= 2       # the backends are spread
    entries = [backend(sim, "xai", n, max_concurrent=2, rate_limit_tpm=60_000) for n in names]
    r1 = shared_router(cluster.url, p, entries, strategy="round-robin", retry_max_delay=30)
    r2 = shared_router(cluster.url, p, entries, strategy="round-robin", retry_max_delay=30)
    served = [(await r.complete("grok-4.1", MESSAGES, agent_id="cl")).backend for r in (r1, r2) * 6]
    assert served == names * 2                                  # one rotation for both routers
    sim.script("rdx-cl-a", [Fault.status(429, retry_after=20)])
    out = await asyncio.wait_for(asyncio.gather(
        *(r.complete("grok-4.1", MESSAGES, agent_id=f"cl{i % 3}", thread_id=f"t{i % 2}")
          for i, r in enumerate((r1, r2) * 20))), 60)
    assert len(out) == 40
    left = await r2.cooldowns()                                 # the 429 seen by one router: shared
    assert set(left) == {"rdx-cl-a"} and 10 < left["rdx-cl-a"] <= 20
    for n in names:                                             # a backend's keys: one slot
        keys = [f"{p}:{{{n}}}:bucket", f"{p}:{{{n}}}:slots"] + ([f"{p}:{{{n}}}:cool"] if n == "rdx-cl-a" else [])
        assert {db.keyslot(k) for k in keys} == {db.keyslot(f"{{{n}}}")}
        assert db.exists(keys[0])
    assert db.exists(f"{p}:{{rdx-cl-a}}:cool") and db.exists(f"{p}:rr:grok-4.1")
    usage_keys = [k for node in db.get_primaries() for k in db.keys(f"{p}:usage:*", target_nodes=node)]
    assert len(usage_keys) > 9 and {db.keyslot(k) for k in usage_keys} == {db.keyslot(f"{{{p}}}")}
    # the fleet's usage, read back: through the routers, the store and the CLI
    all_usage = r1.get_all_usage()
    assert sum(u.request_count for u in all_usage.values()) == 52
    assert {k: asdict(v) for k, v in r2.get_all_usage("backend").items()} == \
        {k: asdict(v) for k, v in r1.get_all_usage("backend").items()}
    assert sum(u.request_count for u in r1.get_all_usage("thread").values()) == 52
    shown = usage_cli(tmp_path, cluster.url, p, "--by", "event", "--csv", "-")
    assert shown.returncode == 0, shown.stderr
    events = list(csv.DictReader(shown.stdout.splitlines()))
    assert sum(1 for e in events if e["outcome"] == "ok") == 52
    assert any(e["outcome"].startswith("retried") for e in events)       # the 429
    r1.reset_agent_usage("cl0")                                 # a transaction on the usage slot
    assert "cl0" not in r2.get_all_usage()
    r2.reset_agent_usage()
    assert r1.get_all_usage() == {}
    await r1.aclose()
    await r2.aclose()
    no_redirects(caplog)
    assert not any(rec.levelno >= logging.WARNING for rec in caplog.records          # (the price warning
                   if rec.name.startswith("xml_pipeline_llm")                     # comes once a process)
                   and not rec.getMessage().startswith("no price for")), caplog.text


async def test_leases_of_several_backends_are_renewed_on_their_own_nodes(sim, cluster, caplog):
    from xml_pipeline_llm import LLMRouter
    from xml_pipeline_llm.shared.state import RedisState

    caplog.set_level(logging.DEBUG)
    p = prefix()
    names = ["rdx-cl-ln-a", "rdx-cl-ln-b", "rdx-cl-ln-c"]
    cfg = load_config({"llm": llm_block(cluster.url, p, [backend(sim, "xai", n, max_concurrent=1) for n in names],
                                        strategy="round-robin")})
    r = LLMRouter(cfg, state=RedisState(cluster.url, p, lease=0.6))
    for n in names:
        sim.set_latency(n, 3.0)       # in flight well past the 1.2 s looked at, however late the last starts
    try:
        calls = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES)) for _ in names]
        deadline = time.monotonic() + 10
        while sum(sim.stats(n).in_flight for n in names) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        db = cluster.client()
        assert len({cluster.node_of(f"{{{n}}}").port for n in names}) >= 2     # one RENEW per node
        started = time.monotonic()
        while time.monotonic() - started < 1.2:                 # twice the lease: renewed meanwhile
            for n in names:
                (_, expiry), = db.zrange(f"{p}:{{{n}}}:slots", 0, -1, withscores=True)
                assert expiry > time.time() * 1000, n
            await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*calls), 10)
    finally:
        for n in names:
            sim.set_latency(n, 0)
    await r.aclose()
    no_redirects(caplog)
    assert not [m for m in caplog.messages if "expired" in m or "failed" in m]


# ------------------------------------------------------------------ cluster, several processes

def test_fleet_holds_max_concurrent_and_one_token_bucket_on_a_cluster(sim, cluster, fleet):
    fleet_holds_max_concurrent_and_one_token_bucket(sim, cluster, fleet[0])


def test_fleet_usage_totals_are_exact_on_a_cluster(sim, cluster, fleet):
    fleet_usage_totals_are_exact(sim, cluster, fleet[0])


def test_the_workers_logged_no_redirection(fleet):
    text = fleet[1].read_text(errors="replace")
    assert not REDIRECTS.search(text) and "Traceback" not in text, text[-2000:]


# ------------------------------------------------------------------ a node restarted (last: it empties a node)

async def test_a_cluster_node_restarted_mid_run(sim, cluster, caplog):
    caplog.set_level(logging.DEBUG)
    name = "rdx-cl-rs-a"
    victim = cluster.node_of(f"{{{name}}}")
    p = prefix()
    while cluster.node_of(f"{{{p}}}") is victim:               # usage on another node: it must stay exact
        p = prefix()
    r = shared_router(cluster.url, p, [backend(sim, "xai", name, max_concurrent=4, rate_limit_tpm=100_000)])
    state = r.state
    db = cluster.client()
    total = 0

    async def burst(n: int) -> None:
        nonlocal total
        out = await asyncio.wait_for(asyncio.gather(
            *(r.complete("grok-4.1", MESSAGES, agent_id="restart") for _ in range(n))), 30)
        assert len(out) == n
        total += n

    await burst(4)
    assert r.get_agent_usage("restart").request_count == 4
    victim.kill()
    try:
        await burst(6)                                          # that node away: calls go on, locally
        await burst(6)
        assert any("unreachable" in m for m in caplog.messages)
    finally:
        victim.start()                                          # same port, same nodes.conf, empty
    cluster.wait_ok()
    deadline = time.monotonic() + 20
    while True:                                                 # Redis is tried again once a second
        await asyncio.sleep(0.3)
        await burst(2)
        if not state.conn.health.down and db.exists(f"{p}:{{{name}}}:bucket"):
            break
        assert time.monotonic() < deadline, "shared state did not resume"
    # the limits are in the cluster again: a call in flight holds a slot there
    sim.set_latency(name, 1.0)
    try:
        call = asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="restart"))
        deadline = time.monotonic() + 10
        while db.zcard(f"{p}:{{{name}}}:slots") != 1:
            assert time.monotonic() < deadline, "no slot taken in the cluster"
            await asyncio.sleep(0.02)
        await call
        total += 1
    finally:
        sim.set_latency(name, 0)
    await burst(2)
    # nothing lost and nothing counted twice: the usage node never went away
    assert r.get_agent_usage("restart").request_count == total
    assert db.xlen(f"{p}:usage:{{{p}}}:events") == total
    assert any("answers again" in m for m in caplog.messages)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING
                and rec.name.startswith("xml_pipeline_llm")]
    assert len([m for m in warnings if "unreachable" in m]) == 1, warnings
    await r.aclose()
    no_redirects(caplog)
