"""Structured JSON logs: one object per line, never a token, cookie or secret.

Records carry only what the code puts in them; messages from our modules
never include token values, and the access line holds the route, not the query.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from json.encoder import encode_basestring_ascii as json_string  # what json.dumps itself uses for a str
from typing import Any

from .models import Identity, Session

ACCESS = logging.getLogger("sidecar.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, separators=(",", ":"), default=str)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True


class AccessLog:
    """One JSON line per request, written in batches.

    Going through ``logging`` (a record, a handler lock, a formatter) and a write syscall per
    request halved the sidecar's throughput; lines are instead gathered and written together at
    most ``_DELAY`` later, and at shutdown. A crash can lose that last fraction of a second."""

    _DELAY = 0.05
    _MAX_LINES = 512

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, fields: dict[str, Any]) -> None:
        entry = {"ts": round(time.time(), 3), "level": "info", "logger": ACCESS.name, "msg": "request", **fields}
        self.add(json.dumps(entry, separators=(",", ":"), default=str))

    def add(self, line: str) -> None:
        """A formatted line, written with the next batch."""
        self._lines.append(line)
        if len(self._lines) >= self._MAX_LINES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._DELAY, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines or not ACCESS.isEnabledFor(logging.INFO):
            self._lines.clear()
            return
        text, self._lines = "\n".join(self._lines) + "\n", []
        sys.stderr.write(text)  # looked up now, so a redirected stderr is honoured
        sys.stderr.flush()


_access_log = AccessLog()


def access(fields: dict[str, Any]) -> None:
    _access_log.write(fields)


# The access line, preformatted: byte for byte what ``json.dumps`` makes of the same fields in the same order
# (``{"ts","level","logger","msg","request_id","method","route","path","status","latency_ms","user","client_ip"}``),
# but the parts fixed per route and per session object are rendered once. Every string that can come from
# the client (method, path, request id) goes through the JSON string encoder, so the line stays one valid object.
_ACCESS_START = '{"ts":'
_ACCESS_FIXED = ',"level":"info","logger":' + json_string(ACCESS.name) + ',"msg":"request","request_id":'
_NO_USER = ',"user":null,"client_ip":'
_route_parts: dict[str, str] = {}


def _route_part(route: str) -> str:
    part = _route_parts.get(route)
    if part is None:
        part = _route_parts[route] = ',"route":' + json_string(route) + ',"path":'
    return part


def _user_part(session: Session | None) -> str:
    """``"user"`` of a session object, rendered once: a cached session answers many requests."""
    if session is None:
        return _NO_USER
    part: str | None = session.derived.get("log_user")
    if part is None:
        part = session.derived["log_user"] = ',"user":' + json_string(session.identity.user) + ',"client_ip":'
    return part


_ts_ms = -1  # the whole milliseconds _ts_text renders
_ts_text = ""


def _timestamp() -> str:
    """``repr(round(time.time(), 3))`` without ``round`` and ``repr`` on a float (both go through the slow
    correctly rounded decimal conversion): whole milliseconds as digits, rendered once per millisecond. The
    same text: the shortest decimal of a 13-digit number is its digits without trailing zeros."""
    global _ts_ms, _ts_text
    ms = int(time.time() * 1000.0 + 0.5)
    if ms != _ts_ms:
        seconds, frac = divmod(ms, 1000)
        _ts_ms, _ts_text = ms, f"{seconds}.{frac:03d}".rstrip("0") if frac else f"{seconds}.0"
    return _ts_text


def latency_ms(seconds: float) -> str:
    """``repr(round(seconds * 1000, 2))`` with one float conversion instead of three. ``round(x, 2)`` and
    ``f"{x:.2f}"`` take the same two decimals of x (both correctly rounded, ties by the exact binary value);
    ``repr`` of the rounded float is those digits without trailing zeros but one (``12.5``, ``12.0``), since
    two different decimals of at most 15 significant digits are never the same float. True for any latency
    below 10**13 ms; beyond 10**16 ``repr`` would switch to an exponent."""
    text = f"{seconds * 1000.0:.2f}"
    return text[:-1] if text[-1] == "0" else text


def _line(
    request_id: str,
    method: str,
    route: str,
    path: str,
    status: int,
    latency: str,
    session: Session | None,
    client_ip: str,
) -> str:
    route_part = _route_parts.get(route) or _route_part(route)
    user_part = _NO_USER if session is None else (session.derived.get("log_user") or _user_part(session))
    return (
        f'{_ACCESS_START}{_timestamp()}{_ACCESS_FIXED}{json_string(request_id)},"method":{json_string(method)}'
        f'{route_part}{json_string(path[:200])},"status":{status:d},"latency_ms":{latency}{user_part}'
        f"{json_string(client_ip)}}}"
    )


def access_line(
    request_id: str,
    method: str,
    route: str,
    path: str,
    status: int,
    latency_ms: float,
    session: Session | None,
    client_ip: str,
) -> str:
    """One access log line (no newline) with the latency already in milliseconds; see ``access_request``."""
    return _line(request_id, method, route, path, status, repr(latency_ms), session, client_ip)


def access_request(
    request_id: str,
    method: str,
    route: str,
    path: str,
    status: int,
    seconds: float,
    session: Session | None,
    client_ip: str,
) -> None:
    """The request's access line: route and path (never the query), status, latency in milliseconds to two
    decimals, user and client address."""
    _access_log.add(_line(request_id, method, route, path, status, latency_ms(seconds), session, client_ip))


def flush() -> None:
    _access_log.flush()


EVENTS = logging.getLogger("sidecar.events")


def event(name: str, fields: dict[str, Any], level: int = logging.INFO) -> None:
    """One line an operator can act on (sign-in, sign-out, refresh, denial, refused cookie, upstream error).

    Callers pass only identities, reasons, addresses and timings; never a token, cookie or secret."""
    if EVENTS.isEnabledFor(level):
        EVENTS.log(level, name, extra={"fields": {"event": name, **fields}})


def sub_hash(sub: str) -> str:
    """The subject, hashed: lines about one user correlate without the provider's raw identifier."""
    return hashlib.sha256(b"sub:" + sub.encode()).hexdigest()[:16]


def who(identity: Identity) -> dict[str, str]:
    """The user as headers name them, and the hashed subject; never the claims or tokens behind them."""
    return {"user": identity.user, "sub_hash": sub_hash(identity.sub)}
