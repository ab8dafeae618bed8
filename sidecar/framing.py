"""HTTP/1.x answers as bytes, framed the way aiohttp frames its own: for the answers that are written
without aiohttp's response objects (the ``--auth-address`` listener, and decision-cache hits on either
listener), so a front sees the same bytes whichever listener answers."""

from __future__ import annotations

import email.utils
import time
from http import HTTPStatus

from aiohttp import web

_date_cache: list[int | str] = [0, ""]


def http_date() -> str:
    """The Date header, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, usegmt=True)
    return str(_date_cache[1])


def plain(status: int, text: str, version: tuple[int, int], keep_alive: bool) -> bytes:
    """A short text answer (refusals, 404, 405), framed as aiohttp frames its own."""
    body = text.encode()
    head = status_line(status, version) + "Content-Type: text/plain; charset=utf-8\r\n"
    head += f"Content-Length: {len(body)}\r\nDate: {http_date()}\r\n" + connection(version, keep_alive) + "\r\n"
    return head.encode() + body


def status_line(status: int, version: tuple[int, int]) -> str:
    line = _STATUS_LINES.get((status, version))
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _STATUS_LINES[(status, version)] = f"HTTP/{version[0]}.{version[1]} {status} {reason}\r\n"
    return line


_STATUS_LINES: dict[tuple[int, tuple[int, int]], str] = {}


def connection(version: tuple[int, int], keep_alive: bool) -> str:
    """aiohttp's rule: HTTP/1.0 kept alive says so, HTTP/1.1 closing says so, otherwise nothing."""
    if keep_alive:
        return "Connection: keep-alive\r\n" if version == (1, 0) else ""
    return "Connection: close\r\n" if version == (1, 1) else ""


def serialize(response: web.StreamResponse, version: tuple[int, int], keep_alive: bool, head: bool) -> bytes:
    """The bytes aiohttp would send for this response: its headers in order, Content-Length, Date,
    Connection; the body unless HEAD. No Server header (the main listener drops it too)."""
    body = (response.body if isinstance(response, web.Response) else None) or b""
    if not isinstance(body, bytes):
        raise TypeError("the auth answer must be a plain body")
    text = status_line(response.status, version) + "".join(
        [f"{name}: {value}\r\n" for name, value in response.headers.items() if name.lower() not in _FRAMING]
    )
    if response.cookies:
        text += "".join(f"Set-Cookie: {morsel.OutputString()}\r\n" for morsel in response.cookies.values())
    if "\n" in text.replace("\r\n", ""):  # a header value may never split the head
        raise ValueError("newline in a response header")
    if body or not head:  # aiohttp sends no length for an empty answer to HEAD
        text += f"Content-Length: {len(body)}\r\n"
    text += f"Date: {http_date()}\r\n{connection(version, keep_alive)}\r\n"
    data = text.encode("utf-8", "surrogateescape")
    return data if head else data + body


_FRAMING = frozenset({"content-length", "date", "connection", "server", "transfer-encoding"})
