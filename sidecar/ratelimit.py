"""A per-client token bucket for the anonymous sign-in endpoints, kept in process memory.

``/oauth2/start`` and ``/oauth2/callback`` answer anyone, so one client must not be
able to make the sidecar (or the provider behind it) do unbounded work. Memory is
bounded: past ``max_clients`` the least recently seen client's bucket is dropped
(a dropped bucket starts full again, which only forgives that one client).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from functools import lru_cache

IPV6_PREFIX = 64  # one IPv6 host usually holds a whole /64: its addresses share one bucket


class RateLimiter:
    """Token buckets keyed by client; ``take`` answers how long to wait (0 when allowed)."""

    def __init__(self, max_clients: int = 10_000) -> None:
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, per_minute: float, burst: float, now: float) -> float:
        """Spend one token for ``client``; returns 0.0 when allowed, else the seconds until one is back."""
        if per_minute <= 0:
            return 0.0  # limiting is off
        rate = per_minute / 60.0
        client = client_key(client)
        tokens, at = self._buckets.pop(client, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - at) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / rate

    def __len__(self) -> int:
        return len(self._buckets)


@lru_cache(maxsize=4096)
def client_key(client: str) -> str:
    """The bucket of a client address: an IPv6 address counts as its /64 (a host may pick any address in
    it, one per request); one that stands for an IPv4 client (mapped, 6to4, Teredo, NAT64) as that IPv4
    address; anything else (a session id) as is."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        v4 = embedded_ipv4(address)
        if v4 is not None:
            return str(v4)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return client


_IPV4_IN_LOW_BITS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client an IPv6 address stands for. Counted as that IPv4 address (or its network), otherwise
    6to4 (2002:V4::/48, one /48 per IPv4 address) and Teredo (the high bits hold the server's address,
    which the sender picks) would give the holder of one IPv4 address thousands of buckets, and the
    translation prefixes (NAT64, SIIT) would lump every IPv4 client into one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _IPV4_IN_LOW_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def retry_after(seconds: float) -> str:
    """A Retry-After value in whole seconds, never 0."""
    return str(max(1, math.ceil(seconds)))
