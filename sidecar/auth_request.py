"""``AuthRequest``: the part of ``web.Request`` the ``/oauth2/auth`` decision reads, over what the lean
``--auth-address`` listener parsed, so that listener runs the very same decision without aiohttp's request."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy, MultiDictProxy
from yarl import URL


class AuthRequest:
    """The part of ``web.Request`` the auth decision reads, over what llhttp parsed.

    ``auth_decision.auth``, ``guard.authenticate``, ``context.view_of`` and the ``guarded`` wrapper read
    headers, the raw query, the peer, the host and per-request keys; this gives them exactly those,
    without aiohttp's per-request objects. The URL and query are built only when asked for."""

    __slots__ = ("method", "path", "raw_query", "headers", "remote", "app", "version", "_keys", "__dict__")

    secure = False  # this listener speaks plain HTTP, as the main one does
    body_exists = False
    can_read_body = False
    content_length = None

    def __init__(
        self,
        app: web.Application,
        method: str,
        path: str,
        raw_query: str,
        headers: CIMultiDictProxy[str],
        remote: str | None,
        version: tuple[int, int],
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.raw_query = raw_query
        self.headers = headers
        self.remote = remote
        self.version = version
        self._keys: dict[Any, Any] = {}

    @cached_property
    def rel_url(self) -> _RelUrl:
        return _RelUrl(self.path, self.raw_query)

    @cached_property
    def query(self) -> MultiDictProxy[str]:
        query: MultiDictProxy[str] = self.rel_url.query
        return query

    @property
    def raw_path(self) -> str:
        return self.rel_url.raw_path_qs

    @property
    def path_qs(self) -> str:
        return str(self.rel_url.path_qs)

    @property
    def host(self) -> str:
        return self.headers.get("Host") or ""

    @property
    def scheme(self) -> str:
        return "http"

    @cached_property
    def url(self) -> URL:
        return URL.build(scheme="http", authority=self.host or "localhost").join(self.rel_url._url_or_build())

    def get(self, key: Any, default: Any = None) -> Any:
        return self._keys.get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._keys[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._keys[key] = value

    def __contains__(self, key: Any) -> bool:
        return key in self._keys


class _RelUrl:
    """``request.rel_url`` for the raw strings the decision reads on every request (``raw_query_string``);
    anything else is asked of the full ``yarl.URL``, built on first use."""

    __slots__ = ("raw_path", "raw_query_string", "_url")

    def __init__(self, raw_path: str, raw_query: str) -> None:
        self.raw_path = raw_path
        self.raw_query_string = raw_query
        self._url: URL | None = None

    @property
    def raw_path_qs(self) -> str:
        return f"{self.raw_path}?{self.raw_query_string}" if self.raw_query_string else self.raw_path

    def _url_or_build(self) -> URL:
        if self._url is None:
            self._url = URL.build(path=self.raw_path, query_string=self.raw_query_string, encoded=True)
        return self._url

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._url_or_build(), name)
