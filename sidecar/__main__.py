"""``sidecar`` / ``python -m sidecar``: parse settings, then serve with one or more workers."""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import shutil
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
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _claim(host: str, port: int) -> None:
    """Fail with EADDRINUSE when anything already listens on the address, including another sidecar.

    The kernel lets every SO_REUSEPORT socket of one user bind a port that other SO_REUSEPORT
    sockets hold, so a second multi-worker sidecar would quietly share the port with the first.
    A probe without SO_REUSEPORT (but with SO_REUSEADDR, so TIME_WAIT leftovers of a restart do
    not count) conflicts with any listening socket; it is closed again before the workers bind."""
    _bind(host, port, listen=False).close()


async def serve(
    config: Config, sock: socket.socket, metrics_sock: socket.socket | None, auth_sock: socket.socket | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let in-flight requests finish."""
    from aiohttp import web

    from .app import build_app, build_metrics_app
    from .auth_listener import AuthListener
    from .hits import HitFirstSite

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
        await HitFirstSite(runner, listener).start()  # a SockSite; on the main app, hits first
    auth = None
    if auth_sock is not None:  # --auth-address: the same app's services and decision, on a lean listener
        auth = AuthListener(runners[0].app, config)
        await auth.start(auth_sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fields: dict[str, Any] = {"address": config.http_address, "pid": os.getpid()}
    if auth is not None:
        fields["auth_address"] = config.auth_address
    log.info("listening", extra={"fields": fields})
    checking = asyncio.ensure_future(_check_provider(runners[0].app))
    await stop.wait()
    checking.cancel()
    log.info("shutting down", extra={"fields": {"pid": os.getpid()}})
    if auth is not None:
        auth.stop_accepting()
    await _shutdown(runners, config.shutdown_timeout, auth)


async def _check_provider(app: Any) -> None:
    """Fetch the provider's discovery document at start, so a wrong or unreachable issuer is an error in
    the log straight away rather than at the first sign-in (``/ready`` stays 503 until it succeeds)."""
    from .context import SERVICES
    from .errors import ProviderError

    try:
        await app[SERVICES].oidc.metadata()
    except ProviderError as exc:
        fields = {"issuer": app[SERVICES].config.oidc_issuer_url, "error": type(exc).__name__, "detail": str(exc)}
        log.error("identity provider not usable at start: check --oidc-issuer-url", extra={"fields": fields})


_CLOSE_MARGIN = 0.5  # seconds after the deadline for closing Redis and the HTTP clients


async def _shutdown(runners: Sequence[Any], timeout: float, auth: Any = None) -> None:
    """Stop accepting at once; in-flight requests get ``timeout`` from SIGTERM, then are cut.

    aiohttp's ``runner.cleanup`` waits ``shutdown_timeout`` for handlers and then, after asking
    them to stop, up to ``shutdown_timeout`` again, so a request waiting on its upstream outlived
    the setting about twice. Here one deadline covers all of it: when it passes, every task still
    running at SIGTERM (request handlers, a refresh in flight) is cancelled, which ends aiohttp's
    waits at once, and closing the store and HTTP clients gets a short margin after it.

    The ``--auth-address`` listener (``auth``) answers what it has read, while the main listener
    stops accepting, before the app's cleanup closes the store both of them use."""

    async def cleanup_all() -> None:
        if auth is not None:
            await asyncio.gather(auth.drain(), *(site.stop() for site in list(runners[0].sites)))
        for runner in runners:
            await runner.cleanup()

    # What runs now is what the deadline may cut: request handlers (one task per connection) and
    # background work. Tasks that aiohttp's own cleanup starts later are not in this set.
    running = asyncio.all_tasks() - {asyncio.current_task()}
    cleanup = asyncio.ensure_future(cleanup_all())
    done, _ = await asyncio.wait({cleanup}, timeout=timeout)
    if done:
        return cleanup.result()
    cut = [task for task in running if not task.done()]
    log.warning("shutdown timeout: cutting in-flight requests", extra={"fields": {"tasks": len(cut)}})
    for task in cut:
        task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(cleanup), _CLOSE_MARGIN)
    except TimeoutError:
        log.warning("shutdown: closing connections took too long; exiting anyway")


def _run_worker(
    config: Config,
    sock: socket.socket | None,
    metrics_sock: socket.socket | None,
    auth_sock: socket.socket | None = None,
) -> None:
    """One worker. With several, each listens on its own SO_REUSEPORT socket: the kernel then spreads
    connections evenly, where one shared accept queue lets a single busy worker take most of them."""
    from . import logs

    if sock is None:
        sock = _bind(config.listen_host, config.listen_port, reuse_port=True)
        if config.auth_port is not None:
            auth_sock = _bind(config.auth_host or "", config.auth_port, reuse_port=True)
    logs.setup(config.log_level)
    try:
        import uvloop  # speed: a faster event loop where available

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config, sock, metrics_sock, auth_sock))


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


def _auth_socket(config: Config) -> socket.socket | None:
    """``--auth-address`` like ``--http-address``: one worker gets a listening socket from here; with
    several the address is only claimed here and each worker listens on its own SO_REUSEPORT socket."""
    if config.auth_port is None:
        return None
    host = config.auth_host or ""
    if config.workers > 1:
        _claim(host, config.auth_port)
        return None
    return _bind(host, config.auth_port)


def _cannot_listen(option: str, address: str, exc: OSError) -> int:
    """One line naming the option, exit code 2 (like any other bad setting)."""
    what = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    sys.stderr.write(f"sidecar: error: {option}: cannot listen on {address} ({what})\n")
    return 2


def _metrics_dir(config: Config) -> str | None:
    """Prepare ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported anywhere; returns the
    directory made here (to remove at exit), if any.

    With several workers each writes its own files. Files left by an earlier run would be merged into
    this run's counters, so the client's own files (``*.db``) are removed at start; nothing else in
    the directory is touched."""
    made = None
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sidecar-metrics-")
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(".db") and os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:  # before any setting is checked: it must work with none given
        from .app import version

        sys.stdout.write(f"sidecar {version()}\n")
        return 0
    config = config_or_exit(args)
    made = _metrics_dir(config)
    try:
        return _main(config)
    finally:
        if made is not None and os.getpid() == _MAIN_PID:
            shutil.rmtree(made, ignore_errors=True)


_MAIN_PID = os.getpid()


def _main(config: Config) -> int:
    from . import logs, metrics

    logs.setup(config.log_level)
    fields = {"version": metrics.version(), "pid": os.getpid(), "settings": config.public()}
    log.info("starting", extra={"fields": fields})
    try:
        # With several workers the parent only holds the address (bound, not listening, so the
        # kernel never queues a connection on it); each worker listens on its own socket.
        if config.workers > 1:
            _claim(config.listen_host, config.listen_port)
        sock = _bind(config.listen_host, config.listen_port, reuse_port=config.workers > 1, listen=config.workers == 1)
    except OSError as exc:
        return _cannot_listen("--http-address", config.http_address, exc)
    try:
        metrics_sock = _bind(config.metrics_host or "", config.metrics_port) if config.metrics_port else None
    except OSError as exc:
        sock.close()
        return _cannot_listen("--metrics-address", config.metrics_address, exc)
    try:
        auth_sock = _auth_socket(config)
    except OSError as exc:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        return _cannot_listen("--auth-address", config.auth_address, exc)
    if config.workers == 1:
        _run_worker(config, sock, metrics_sock, auth_sock)
        return 0
    return _supervise(config, metrics_sock)


if __name__ == "__main__":
    raise SystemExit(main())
