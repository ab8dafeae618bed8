"""Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document, MCP 2025-11-25).

With ``--oauth-client-metadata-documents`` a ``client_id`` may be an https URL naming a JSON document with the
client's metadata; the sidecar fetches it when the client first shows up (an unauthenticated ``/authorize``,
device authorization or token request), so anyone on the internet can make the sidecar fetch a URL. The
fetch is therefore treated as hostile (server-side request forgery, slow or huge answers, floods):

- The URL: ``https`` only, a lower-case DNS name or canonical IP literal (no decimal, octal or hex spellings of
  an address), default or explicit port, a path other than ``/`` without dot segments, no user info, query or
  fragment. With ``--oauth-client-metadata-hosts`` only those hosts are accepted.
- The address: the sidecar resolves the name itself and refuses loopback, private, link-local, multicast,
  reserved, shared and unspecified addresses (IPv4, IPv6, and IPv4 embedded in IPv6: mapped, NAT64, 6to4)
  unless the host is listed (an internal client registry). It then connects to exactly the addresses it
  checked (``_PinnedResolver``: no second resolution for a rebinding DNS server to answer differently); TLS
  still sends SNI for the name and verifies the certificate against it (system trust plus
  ``--oauth-client-metadata-ca-file``).
- The answer: no redirects followed, 5 s for everything, ``application/json`` (or ``+json``), no content
  encoding, at most 5 KiB read incrementally.
- The document: ``client_id`` equal to the URL (simple string comparison), no client secret, public clients
  only (``token_endpoint_auth_method`` ``none``; ``private_key_jwt`` is not supported), the rest by the same
  rules as dynamic registration (``client_metadata.check_metadata``: redirect URIs, grant types, scope, no
  invisible or bidi characters in the name).
- Load: a good document is cached in this process per its ``Cache-Control: max-age`` within 5 min to 24 h
  (1 h without one); a failure is remembered for ``FAILURE_HOLD`` seconds (the draft says not to cache error
  responses; this is a short back-off, so a flood of authorize requests for one broken URL costs one fetch);
  concurrent requests for one URL share one fetch; at most ``MAX_FETCHES`` fetches run at once.

Nothing vouches for the document's ``client_name``: the consent page shows the URL's host prominently and the
name as the client's own claim. Such clients are never stored; grants name them by their URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from .. import logs
from ..config import Config
from ..rules import valid_hostname
from .client_metadata import Refused, check_metadata
from .model import Client
from .service import OAUTH

log = logging.getLogger("sidecar.oauth")

FETCH_TIMEOUT = 5.0  # resolution, connection, TLS and the body, all together
MAX_DOCUMENT_BYTES = 5 * 1024  # the draft's recommendation
MAX_URL_CHARS = 2000
USER_AGENT = "sidecar (client metadata document fetch)"
MIN_CACHE, DEFAULT_CACHE, MAX_CACHE = 300.0, 3600.0, 86400.0
FAILURE_HOLD = 15.0
MAX_FETCHES = 4  # concurrent fetches per process
MAX_ENTRIES = 1000  # cached documents and failures per process (least recently used dropped first)
_FORBIDDEN = ("client_secret", "client_secret_expires_at")
_URL_CHARS = re.compile(r"[A-Za-z0-9._~:/%!$&'()*+,;=@\[\]-]+")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_JSON_TYPE = re.compile(r"application/([a-z0-9.+-]+\+)?json")
_REGISTERED_ID = re.compile(r"[A-Za-z0-9._~:/-]{1,255}")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 6890 blocks that not every Python version counts as non-global (IETF protocol assignments, 6to4 relays)
_ALSO_SPECIAL = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv4Network("192.88.99.0/24"))


class DocumentRefused(Exception):
    """Why a metadata document is not accepted: fixed text (and the HTTP status), shown on the error page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_metadata_url(client_id: str) -> bool:
    """Registered client ids are random url-safe text, never a URL: an https client_id names a document."""
    return client_id.startswith("https://")


# --- the URL and its addresses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str  # as the URL writes it (brackets around IPv6)
    port: int
    listed: bool  # in --oauth-client-metadata-hosts: private addresses allowed

    @property
    def bare_host(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host


def parse_url(url: str, hosts: tuple[str, ...]) -> Target:
    """The host and port to fetch ``url`` from; raises DocumentRefused (see the module docstring)."""
    if "#" in url or "?" in url:
        raise DocumentRefused("the client_id URL may not have a query or fragment")
    if len(url) > MAX_URL_CHARS or not url.isascii() or not _URL_CHARS.fullmatch(url):
        raise DocumentRefused("the client_id URL has characters or a length it may not have")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise DocumentRefused("the client_id is not a URL") from None
    if parts.scheme != "https" or not url.startswith("https://"):
        raise DocumentRefused("the client_id URL must be https")
    if "@" in parts.netloc:
        raise DocumentRefused("the client_id URL may not carry user info")
    segments = parts.path.split("/")
    if parts.path in ("", "/") or any(s in (".", "..") for s in segments) or "%2e" in parts.path.lower():
        raise DocumentRefused("the client_id URL needs a path, without dot segments")
    host, port = _host_port(parts.netloc)
    if hosts and host not in hosts:
        raise DocumentRefused("documents from this host are not accepted here")
    return Target(host, port, host in hosts)


def _host_port(netloc: str) -> tuple[str, int]:
    if netloc.startswith("["):
        host, _, rest = netloc.partition("]")
        host += "]"
        if "%" in host:  # a zone id names an interface of this machine
            raise DocumentRefused("the client_id URL's IPv6 address must be written in its canonical form")
        try:
            canonical = str(ipaddress.IPv6Address(host[1:-1])) == host[1:-1]
        except ValueError:
            canonical = False
        if not canonical:
            raise DocumentRefused("the client_id URL's IPv6 address must be written in its canonical form")
    else:
        host, sep, port_text = netloc.partition(":")
        rest = sep + port_text
        if not host or host != host.lower() or not valid_hostname(host):
            raise DocumentRefused("the client_id URL's host must be a lower-case DNS name or IP address")
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]) and not _canonical_ipv4(host):
            raise DocumentRefused("the client_id URL's address must be written as four decimal numbers")
    if not rest:
        return host, 443
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        raise DocumentRefused("the client_id URL's port is invalid")
    return host, int(rest[1:])


def _canonical_ipv4(host: str) -> bool:
    """``10.0.0.1`` yes; ``10.1``, ``0x7f.0.0.1``, ``0177.0.0.1``, ``2130706433`` no (the resolver would take them)."""
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def public_address(address: str) -> bool:
    """May an unlisted host's document be fetched from this address? Only a globally routable unicast one;
    an IPv4 address inside IPv6 (mapped, NAT64, 6to4) is judged as that IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return public_address(str(embedded))
        if ip.teredo is not None or ip.is_site_local:
            return False
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    special = special or any(ip in net for net in _ALSO_SPECIAL)
    return ip.is_global and not special and not ip.is_unspecified


async def resolve(target: Target) -> list[ResolveResult]:
    """Every address of the host, each checked; raises DocumentRefused when one may not be fetched from (a
    name that also resolves to an internal address is refused as a whole, not filtered)."""
    host = target.bare_host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError):
        raise DocumentRefused("the client_id URL's host does not resolve") from None
    results: list[ResolveResult] = []
    for family, _, proto, _, sockaddr in infos:
        address = str(sockaddr[0])
        if not target.listed and not public_address(address):
            raise DocumentRefused("the client_id URL's host has a private or special-use address")
        results.append(
            {
                "hostname": host,
                "host": address,
                "port": target.port,
                "family": family,
                "proto": proto,
                "flags": socket.AI_NUMERICHOST,
            }
        )
    if not results:
        raise DocumentRefused("the client_id URL's host does not resolve")
    return results


class _PinnedResolver(AbstractResolver):
    """Answers the connector with the addresses already checked, and nothing else."""

    def __init__(self, host: str, results: list[ResolveResult]) -> None:
        self._host = host
        self._results = results

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError("only the checked host is resolved")
        return [{**r, "port": port} for r in self._results if family in (socket.AF_UNSPEC, r["family"])]

    async def close(self) -> None:
        return None


# --- the fetch ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    body: bytes
    cache_control: str


async def download(url: str, target: Target, ssl_context: Any) -> Fetched:
    """GET the document from the checked addresses; raises DocumentRefused. One connection per fetch (fetches
    are rare: documents are cached), so nothing of one fetch's pinning leaks into another's."""
    pinned = await resolve(target)  # an IP literal too: its one address is checked like any other
    connector = aiohttp.TCPConnector(
        resolver=_PinnedResolver(target.bare_host, pinned), use_dns_cache=False, ssl=ssl_context, force_close=True
    )
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
    ) as http:
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        async with http.get(url, headers=headers, allow_redirects=False) as response:
            if 300 <= response.status < 400:
                raise DocumentRefused("the client_id URL redirects (redirects are not followed)")
            if response.status != 200:
                raise DocumentRefused(f"the client_id URL answered HTTP {response.status}")
            if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
                raise DocumentRefused("the metadata document may not be compressed")
            if not _JSON_TYPE.fullmatch(response.content_type):
                raise DocumentRefused("the metadata document is not application/json")
            if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                raise DocumentRefused("the metadata document is larger than 5 KiB")
            body = b""
            while len(body) <= MAX_DOCUMENT_BYTES:
                chunk = await response.content.read(MAX_DOCUMENT_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise DocumentRefused("the metadata document is larger than 5 KiB")
            return Fetched(body, response.headers.get("Cache-Control", ""))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate member")
    return dict(pairs)


def client_from_document(url: str, body: bytes) -> Client:
    """The public client the document describes; raises DocumentRefused."""
    try:
        meta = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise DocumentRefused("the metadata document is not JSON (or repeats a member)") from None
    if not isinstance(meta, dict):
        raise DocumentRefused("the metadata document must be a JSON object")
    if meta.get("client_id") != url:
        raise DocumentRefused("the metadata document's client_id is not its URL")
    if any(name in meta for name in _FORBIDDEN):
        raise DocumentRefused("the metadata document may not carry a client secret")
    if meta.get("token_endpoint_auth_method", "none") != "none":
        raise DocumentRefused("only public clients (token_endpoint_auth_method none); private_key_jwt is not supported")
    try:
        checked = check_metadata(meta, default_method="none", methods=("none",))
    except Refused as exc:
        raise DocumentRefused(f"the metadata document is invalid: {exc.description}") from None
    return Client(
        client_id=url,
        client_name=checked.client_name,
        redirect_uris=checked.redirect_uris,
        grant_types=checked.grant_types,
        token_endpoint_auth_method="none",
        secret_hash=None,
        created_at=time.time(),
        registered_from="",
        client_uri=checked.client_uri,
        metadata_document=True,
        scope=checked.scope,
    )


def cache_seconds(cache_control: str) -> float:
    """How long to keep a document: its max-age within [5 min, 24 h]; no-store/no-cache the least; else 1 h."""
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return MIN_CACHE
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age" and value.strip().isdigit():
            return min(MAX_CACHE, max(MIN_CACHE, float(value.strip())))
    return DEFAULT_CACHE


# --- the cache ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    client: Client | None
    reason: str
    until: float


class MetadataDocuments:
    """This process's documents: cached, fetched once per URL at a time, a few fetches at once."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._hosts = config.oauth_client_metadata_hosts
        self._ssl = config.oauth_client_metadata_ssl
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, asyncio.Task[_Entry]] = {}
        self._slots = asyncio.Semaphore(MAX_FETCHES)

    async def client(self, url: str) -> Client:
        """The client described at ``url``; raises DocumentRefused with the reason. A URL that may not be
        fetched at all is refused here, before the cache: garbage URLs cost no fetch slot nor cache entry."""
        target = parse_url(url, self._hosts)
        entry = self._cached(url)
        if entry is None:
            flight = self._flights.get(url)
            if flight is None:
                flight = asyncio.ensure_future(self._fetch(url, target))
                self._flights[url] = flight
                flight.add_done_callback(lambda done: self._landed(url, done))
            entry = await asyncio.shield(flight)  # a client that goes away does not cancel the others' fetch
        if entry.client is None:
            raise DocumentRefused(entry.reason)
        return entry.client

    def would_fetch(self, url: str) -> bool:
        """Would asking for ``url`` start a fetch (a URL that may be fetched, neither cached nor in flight)?"""
        try:
            parse_url(url, self._hosts)
        except DocumentRefused:
            return False
        return url not in self._flights and self._cached(url) is None

    def _cached(self, url: str) -> _Entry | None:
        entry = self._entries.get(url)
        if entry is None:
            return None
        if entry.until <= self._clock():
            del self._entries[url]
            return None
        self._entries.move_to_end(url)
        return entry

    def _landed(self, url: str, flight: asyncio.Task[_Entry]) -> None:
        if self._flights.get(url) is flight:
            del self._flights[url]

    def _hold(self) -> float:
        return self._clock() + FAILURE_HOLD

    def _remember(self, url: str, entry: _Entry) -> None:
        self._entries[url] = entry
        self._entries.move_to_end(url)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    async def _fetch(self, url: str, target: Target) -> _Entry:
        """One fetch with its outcome remembered; never raises (fail closed: anything unexpected refuses)."""
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                await self._slots.acquire()
        except TimeoutError:
            return _Entry(None, "too many client metadata documents are being fetched; try again", 0.0)
        started = time.monotonic()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                fetched = await download(url, target, self._ssl)
            client = client_from_document(url, fetched.body)
            entry = _Entry(client, "", self._clock() + cache_seconds(fetched.cache_control))
        except DocumentRefused as exc:
            entry = _Entry(None, exc.reason, self._hold())
        except TimeoutError:
            entry = _Entry(None, "the client_id URL did not answer in time", self._hold())
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.debug("client metadata fetch failed: %s", type(exc).__name__)
            entry = _Entry(None, "the client_id URL could not be fetched (connection or TLS failed)", self._hold())
        except Exception as exc:  # fail closed: an unforeseen error refuses this client only
            log.warning("client metadata fetch failed unexpectedly: %s", type(exc).__name__)
            entry = _Entry(None, "the client_id URL could not be fetched", self._hold())
        finally:
            self._slots.release()
        self._remember(url, entry)
        fields = {"client_id": url[:200], "ms": int((time.monotonic() - started) * 1000)}
        if entry.client is None:
            logs.event("oauth_client_metadata_refused", {**fields, "reason": entry.reason}, logging.WARNING)
        else:
            logs.event("oauth_client_metadata_fetched", {**fields, "ttl": int(entry.until - self._clock())})
        return entry


DOCUMENTS = web.AppKey("oauth_client_metadata_documents", MetadataDocuments)


async def resolve_client(app: web.Application, client_id: str) -> tuple[Client | None, str]:
    """The client a ``client_id`` names, from its metadata document (when turned on and it is an https URL) or
    the registered clients; ``(None, reason)`` when there is none."""
    oauth = app[OAUTH]
    if oauth.config.oauth_client_metadata_documents and is_metadata_url(client_id):
        try:
            return await app[DOCUMENTS].client(client_id), ""
        except DocumentRefused as exc:
            return None, exc.reason
    if not _REGISTERED_ID.fullmatch(client_id):
        return None, "unknown client"
    return await oauth.store.get_client(client_id), "unknown client"


async def find_client(app: web.Application, client_id: str) -> Client | None:
    return (await resolve_client(app, client_id))[0]
