"""A fixed-rate (open-loop) HTTP/1.1 load generator, for latency at a given load (wrk only does closed loop).

``python -m tests.bench.loadgen --port P --path /oauth2/auth --rate 2000 --duration 8 [--cookie C]``
prints one JSON object. Requests are scheduled at fixed intervals whatever the server does;
latency is measured from the *scheduled* send time, so a stalled server shows up in the
percentiles instead of silently lowering the rate (no coordinated omission). Like wrk2, a fixed
set of keep-alive connections is used (``--connections``, as wrk's ``-c``); a request due while
all are busy waits for the next free one, its wait counted in its latency. Runs in its own
process on uvloop with the garbage collector off, and reports its own CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from array import array
from collections import deque
from collections.abc import Sequence


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = 0.0
        self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, due: float) -> None:
        self.busy, self.due, self.sent = True, due, time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        self.busy = False
        self.gen.done(self, int(head[0].split(" ", 2)[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Gen:
    def __init__(self, port: int, request: bytes, expect: int) -> None:
        self.port, self.request, self.expect = port, request, expect
        self.idle: list[_Conn] = []
        self.waiting: deque[float] = deque()  # due times of requests no connection was free for
        self.all: set[_Conn] = set()
        self.latency = array("d")  # from scheduled time
        self.service = array("d")  # from actual send
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.backlog = 0
        self.opened = 0

    async def connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        self.all.add(conn)
        self.opened += 1
        return conn

    def done(self, conn: _Conn, status: int) -> None:
        now = time.perf_counter()
        self.latency.append(now - conn.due)
        self.service.append(now - conn.sent)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != self.expect:
            self.errors += 1
        if self.waiting:
            conn.send(self.request, self.waiting.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            self.errors += 1

    def fire(self, due: float) -> None:
        if self.idle:
            self.idle.pop().send(self.request, due)
        else:
            self.backlog += 1
            self.waiting.append(due)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def run(
    port: int, path: str, rate: float, duration: float, cookie: str | None, expect: int, connections: int, warmup: float
) -> dict[str, object]:
    header = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if cookie:
        header += f"Cookie: _sidecar={cookie}\r\n"
    gen = _Gen(port, (header + "\r\n").encode(), expect)
    for conn in await asyncio.gather(*(gen.connect() for _ in range(connections))):
        gen.idle.append(conn)
    interval = 1.0 / rate
    for phase_duration, measured in ((warmup, False), (duration, True)):
        if measured:
            gen.latency, gen.service, gen.statuses, gen.errors, gen.backlog = array("d"), array("d"), {}, 0, 0
        total = int(phase_duration * rate)
        start, cpu = time.perf_counter(), time.process_time()
        sent = 0
        while sent < total:
            now = time.perf_counter()
            while sent < total and start + sent * interval <= now:
                gen.fire(start + sent * interval)
                sent += 1
            if sent < total:
                await asyncio.sleep(max(0.001, start + sent * interval - time.perf_counter()))  # ms ticks: never spin
        # let the tail finish (bounded)
        stop_at = time.perf_counter() + 5.0
        while len(gen.latency) + gen.errors < total and time.perf_counter() < stop_at:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    for conn in list(gen.all):
        if conn.transport is not None:
            conn.transport.close()
    return {
        "rate": rate,
        "sent": total,
        "completed": len(gen.latency),
        "achieved_rps": len(gen.latency) / elapsed,
        "errors": gen.errors,
        "statuses": {str(k): v for k, v in gen.statuses.items()},
        "p50_ms": _pct(gen.latency, 0.50),
        "p90_ms": _pct(gen.latency, 0.90),
        "p99_ms": _pct(gen.latency, 0.99),
        "max_ms": _pct(gen.latency, 1.0),
        "service_p50_ms": _pct(gen.service, 0.50),
        "service_p99_ms": _pct(gen.service, 0.99),
        "queued": gen.backlog,
        "connections": gen.opened,
        "generator_cpu": cpu / elapsed,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cookie")
    parser.add_argument("--expect", type=int, default=200)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.install()
    gc.disable()
    result = asyncio.run(
        run(args.port, args.path, args.rate, args.duration, args.cookie, args.expect, args.connections, args.warmup)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
