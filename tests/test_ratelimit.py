"""The per-client token buckets of the anonymous endpoints: one bucket per IPv4 address, per IPv6 /64."""

from __future__ import annotations

import pytest

from sidecar.ratelimit import RateLimiter, client_key


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe"),  # one /64, two addresses
        ("2001:db8:1:2::1", "2001:DB8:1:2:0:0:0:9"),  # spelt differently
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped is the IPv4 client
        ("a:" + client_key("2001:db8::1"), "a:" + client_key("2001:db8::2")),  # a namespaced key
        ("2002:c000:207::1", "2002:c000:207:ffff::9"),  # 6to4: one IPv4 address owns a whole /48
        ("2002:c000:207::1", "192.0.2.7"),  # ... and is that IPv4 client
        # Teredo: the sender picks the server part (bits 32-63); the client is the last 32 bits, inverted
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:c633:6401:8000:63bf:3fff:fdd2"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),
        ("64:ff9b::c000:207", "192.0.2.7"),  # NAT64 well-known prefix: the IPv4 client behind the translator
    ],
)
def test_addresses_of_one_client_share_a_bucket(first: str, second: str) -> None:
    limiter = RateLimiter()
    assert limiter.take(first, 60, 1, 0.0) == 0.0
    assert limiter.take(second, 60, 1, 0.0) > 0  # the burst of one is spent by the first address


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:3::1"),  # neighbouring /64s are different hosts
        ("192.0.2.7", "192.0.2.8"),
        ("session-a", "session-b"),
        ("64:ff9b::c000:207", "64:ff9b::c000:208"),  # two IPv4 clients behind one NAT64 translator
        ("2002:c000:207::1", "2002:c000:208::1"),  # two 6to4 clients
    ],
)
def test_different_clients_have_their_own_buckets(first: str, second: str) -> None:
    limiter = RateLimiter()
    assert limiter.take(first, 60, 1, 0.0) == 0.0
    assert limiter.take(second, 60, 1, 0.0) == 0.0
