"""``sidecar`` / ``python -m sidecar``: parse settings, then serve with one or more workers."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .config import Config
from .config_load import config_or_exit

log = logging.getLogger("sidecar")


def _bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock


async def serve(config: Config, sock: socket.socket, metrics_sock: socket.socket | None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let in-flight requests finish."""
    from aiohttp import web

    from .app import build_app, build_metrics_app

    listeners = [sock]
    runners = [
        web.AppRunner(
            build_app(config), access_log=None, shutdown_timeout=config.shutdown_timeout, handle_signals=False
        )
    ]
    if metrics_sock is not None:
        runners.append(web.AppRunner(build_metrics_app(), access_log=None, handle_signals=False))
        listeners.append(metrics_sock)
    for runner, listener in zip(runners, listeners, strict=True):
        await runner.setup()
        await web.SockSite(runner, listener).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening", extra={"fields": {"address": config.http_address, "pid": os.getpid()}})
    await stop.wait()
    log.info("shutting down", extra={"fields": {"pid": os.getpid()}})
    for runner in runners:
        await runner.cleanup()


def _run_worker(config: Config, sock: socket.socket | None, metrics_sock: socket.socket | None) -> None:
    """One worker. With several, each listens on its own SO_REUSEPORT socket: the kernel then spreads
    connections evenly, where one shared accept queue lets a single busy worker take most of them."""
    from . import logs

    if sock is None:
        sock = _bind(config.listen_host, config.listen_port, reuse_port=True)
    logs.setup(config.log_level)
    try:
        import uvloop  # speed: a faster event loop where available

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config, sock, metrics_sock))


def _supervise(config: Config, metrics_sock: socket.socket | None) -> int:
    """Run N workers on the shared listening sockets; forward SIGTERM; replace crashed workers."""
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def spawn() -> Any:
        proc = ctx.Process(target=_run_worker, args=(config, None, metrics_sock), daemon=False)
        proc.start()
        return proc

    workers = [spawn() for _ in range(config.workers)]

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        for i, proc in enumerate(workers):
            proc.join(timeout=0.2)
            if proc.exitcode is not None and not stopping:
                log.error("worker exited; starting another", extra={"fields": {"exitcode": proc.exitcode}})
                workers[i] = spawn()
        if stopping and all(p.exitcode is not None for p in workers):
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = config_or_exit(sys.argv[1:] if argv is None else argv)
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported anywhere: every worker writes its own files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sidecar-metrics-")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    from . import logs

    logs.setup(config.log_level)
    try:
        # With several workers the parent only holds the address (bound, not listening, so the
        # kernel never queues a connection on it); each worker listens on its own socket.
        sock = _bind(config.listen_host, config.listen_port, reuse_port=config.workers > 1, listen=config.workers == 1)
        metrics_sock = _bind(config.metrics_host or "", config.metrics_port) if config.metrics_port else None
    except OSError as exc:
        sys.stderr.write(f"sidecar: error: --http-address: cannot listen ({exc.strerror})\n")
        return 2
    if config.workers == 1:
        _run_worker(config, sock, metrics_sock)
        return 0
    return _supervise(config, metrics_sock)


if __name__ == "__main__":
    raise SystemExit(main())
