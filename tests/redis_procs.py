"""Real Redis topologies for tests: master + replica + Sentinel, and a 3-master Cluster.

Every process runs on private loopback ports with its own temporary directory
and no persistence. Readiness is checked on what matters (the replica is
linked, the Sentinel knows the master and its replica, every cluster node
reports ``cluster_state:ok``), and ``close()`` stops every process it started.
A missing binary fails the run with the package to install; nothing skips.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

T = TypeVar("T")

MASTER_NAME = "mymaster"


def require(binary: str, package: str) -> str:
    """Never skip: a missing part fails the run and says what to install."""
    path = shutil.which(binary) or next(
        (f"{d}/{binary}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{binary}").exists()), None
    )
    if path is None:
        pytest.fail(
            f"{binary} not found: install it with `apt-get install {package}` (make test does this as root)",
            pytrace=False,
        )
    return path


# Ports for the servers a test starts come from below Linux's ephemeral range (32768-60999 by default),
# which the kernel hands to outgoing connections: a port found free with bind(0) and released could be
# taken as the local end of one of the suite's own client connections before nginx or a server binds it
# (seen: nginx "Address already in use" in a full run). Each pytest-xdist worker walks its own slice.
_PORT_LOW, _PORT_HIGH = 20000, 32000


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (_PORT_HIGH - _PORT_LOW) // max(count, 1)
    start = _PORT_LOW + (index % max(count, 1)) * width
    return range(start, start + width)


_ports = _port_slice()
_next_port = [random.randrange(len(_ports))]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports, each handed out once per cycle through this worker's slice and
    checked by binding it (all held until every one is found)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(len(_ports)):
            if len(socks) == count:
                break
            port = _ports[_next_port[0] % len(_ports)]
            _next_port[0] += 1
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        if len(socks) < count:
            raise RuntimeError(f"no {count} free loopback ports in {_ports.start}-{_ports.stop - 1}")
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{detail}", pytrace=False)
        time.sleep(interval)


def query(port: int, fn: Callable[[redis.Redis], T]) -> T:
    """Run ``fn`` with a short-lived synchronous client on ``port`` and close it."""
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=1,
        socket_connect_timeout=1,
        decode_responses=True,
    )
    try:
        return fn(client)
    finally:
        client.close()


def command(port: int, *args: str) -> Any:
    """One raw command (e.g. ``SENTINEL ...``, ``CLUSTER INFO``) against ``port``."""
    return query(port, lambda c: c.execute_command(*args))  # type: ignore[no-untyped-call]


@dataclass
class Proc:
    """One redis-server / redis-sentinel process."""

    name: str
    port: int
    directory: Path
    popen: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.directory / "out.log"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """Stop abruptly, like a crashed host (no shutdown handshake with the replica)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=5)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _spawn(name: str, argv: list[str], port: int, directory: Path) -> Proc:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "out.log", "wb") as out:
        popen = subprocess.Popen(argv, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    proc = Proc(name, port, directory, popen)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            if query(port, lambda c: c.ping()):
                return proc
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    output = proc.tail()
    proc.stop()
    pytest.fail(f"{name} did not start on port {port}:\n{output}", pytrace=False)


def redis_server_argv(binary: str, port: int, directory: Path) -> list[str]:
    """A throwaway redis-server: loopback only, private port and dir, nothing persisted."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
            "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip


def start_server(name: str, directory: Path, port: int, *extra: str) -> Proc:
    argv = [*redis_server_argv(require("redis-server", "redis-server"), port, directory), *extra]
    return _spawn(name, argv, port, directory)


@dataclass
class Topology:
    """Processes that belong together; ``close()`` stops all of them."""

    procs: list[Proc] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@dataclass
class SentinelTopology(Topology):
    master: Proc | None = None
    replica: Proc | None = None
    sentinel: Proc | None = None
    master_name: str = MASTER_NAME

    @property
    def sentinel_url(self) -> str:
        assert self.sentinel is not None
        return f"redis://127.0.0.1:{self.sentinel.port}"

    def master_addr(self) -> tuple[str, int] | None:
        """The master address the Sentinel currently hands out."""
        assert self.sentinel is not None
        addr = command(self.sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return (addr[0], int(addr[1])) if addr else None

    def wait_promoted(self, timeout: float = 20.0) -> int:
        """After the master dies: wait until the Sentinel names the replica and it is a master."""
        assert self.replica is not None
        replica_port = self.replica.port

        def promoted() -> bool:
            addr = self.master_addr()
            if addr is None or addr[1] != replica_port:
                return False
            return bool(query(replica_port, lambda c: c.info("replication")["role"] == "master"))

        wait_for(
            f"Sentinel to promote the replica on port {replica_port}",
            promoted,
            timeout,
            interval=0.1,
        )
        return replica_port


def _replica_linked(port: int) -> bool:
    info = query(port, lambda c: c.info("replication"))
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


@contextmanager
def sentinel_topology(
    tmp: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 4000
) -> Iterator[SentinelTopology]:
    """A master, one replica of it and one Sentinel (quorum 1) watching them."""
    sentinel_bin = require("redis-sentinel", "redis-sentinel")
    master_port, replica_port, sentinel_port = free_ports(3)
    topo = SentinelTopology()
    try:
        topo.master = topo.add(
            start_server("redis master", tmp / "master", master_port, "--repl-diskless-sync-delay", "0")
        )
        topo.replica = topo.add(
            start_server(
                "redis replica",
                tmp / "replica",
                replica_port,
                "--replicaof",
                "127.0.0.1",
                str(master_port),
                "--repl-diskless-sync-delay",
                "0",
            )
        )
        wait_for("the replica to link to its master", lambda: _replica_linked(replica_port), 10)

        sdir = tmp / "sentinel"
        sdir.mkdir(parents=True, exist_ok=True)
        conf = sdir / "sentinel.conf"  # the Sentinel rewrites this file, so it lives in its own dir
        conf.write_text(
            f"port {sentinel_port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {sdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        topo.sentinel = topo.add(_spawn("redis-sentinel", [sentinel_bin, str(conf)], sentinel_port, sdir))

        def sentinel_ready() -> bool:
            if topo.master_addr() != ("127.0.0.1", master_port):
                return False
            replicas = command(sentinel_port, "SENTINEL", "REPLICAS", MASTER_NAME)
            # decode_responses: each replica is a flat [k, v, k, v, ...] list (RESP2)
            for entry in replicas or []:
                fields = dict(zip(entry[::2], entry[1::2], strict=False)) if isinstance(entry, list) else entry
                if int(fields.get("port", 0)) == replica_port and "disconnected" not in fields.get("flags", ""):
                    return True
            return False

        wait_for("the Sentinel to know the master and its replica", sentinel_ready, 15, interval=0.1)
        yield topo
    finally:
        topo.close()


@dataclass
class ClusterTopology(Topology):
    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{p.port}" for p in self.procs]


def _cluster_ok(port: int, size: int) -> bool:
    info = command(port, "CLUSTER", "INFO")
    if isinstance(info, str):
        info = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return (
        str(info.get("cluster_state")) == "ok"
        and int(info.get("cluster_slots_ok", 0)) == 16384
        and int(info.get("cluster_known_nodes", 0)) == size
    )


@contextmanager
def cluster_topology(tmp: Path, size: int = 3) -> Iterator[ClusterTopology]:
    """``size`` cluster masters sharing all 16384 slots, no replicas."""
    cli = require("redis-cli", "redis-tools")
    ports = free_ports(2 * size)  # a client port and an explicit cluster-bus port per node
    topo = ClusterTopology()
    try:
        for i in range(size):
            port, bus = ports[2 * i], ports[2 * i + 1]
            topo.add(
                start_server(
                    f"cluster node {i}",
                    tmp / f"node{i}",
                    port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-port",
                    str(bus),
                    "--cluster-node-timeout",
                    "2000",
                )
            )
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p.port}" for p in topo.procs),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
        if create.returncode != 0:
            pytest.fail(
                f"redis-cli --cluster create failed:\n{create.stdout.decode(errors='replace')}",
                pytrace=False,
            )
        for proc in topo.procs:
            wait_for(
                f"cluster_state:ok on port {proc.port}",
                functools.partial(_cluster_ok, proc.port, size),
                15,
            )
        yield topo
    finally:
        topo.close()
