"""Who an anonymous registration counts against: its network, and the fair share of the unused pool.

Registered clients no user has granted access to yet ("unused") are bounded in number
(``--oauth-unused-clients-max``), so that anonymous registrations cannot fill the store. A bound alone lets
a few dozen addresses fill it and turn every later registration away, so the pool is shared fairly:

- A registration counts against its **network**: an IPv4 address's /24, an IPv6 address's /48 (an IPv6
  address carrying an IPv4 client, IPv4-mapped, 6to4, Teredo, NAT64/SIIT, as that IPv4 address). These are
  the smallest prefixes routed on the Internet: an attacker holding one address usually holds its neighbours
  (a VM's /64 is 2^64 addresses; a site's /48 is 65,536 /64s), so counting per address, or per /64, would
  let one network take the pool.
- A network holds at most ``--oauth-unused-clients-per-network`` unused clients; its next registration
  forgets its own oldest one (that network is turned away by nobody, and takes nothing from others).
- When the pool is full, a registration forgets the oldest unused client of the network holding the most
  (its own, when it holds as many as any other): a newcomer always gets in, and the pool settles at an
  equal split between the networks registering. To keep a legitimate registration out, an attacker needs
  about ``--oauth-unused-clients-max`` networks of its own, each re-registering before the legitimate
  client is used.

Counted in the grant store (``store_memory.py``, and atomically across replicas in ``store_redis.py``); the
choice of victim is the same rule in both. Addresses behind a trusted front are the ones it reports, as for
every per-address limit.
"""

from __future__ import annotations

import ipaddress

from ..ratelimit import embedded_ipv4

IPV4_NETWORK = 24
IPV6_NETWORK = 48


def network_of(address: str) -> str:
    """``203.0.113.0/24`` for ``203.0.113.7``, ``2001:db8:1::/48`` for ``2001:db8:1:2::9``; anything that is
    not an IP address (a unix socket peer) is its own network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    prefix = IPV4_NETWORK if ip.version == 4 else IPV6_NETWORK
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def victim_network(counts: dict[str, int], network: str, pool_size: int, max_pool: int, share: int) -> str | None:
    """The network whose oldest unused client a registration from ``network`` makes room by forgetting, or
    None when there is room (``counts``: unused clients per network, after expired ones are gone)."""
    own = counts.get(network, 0)
    if own >= share:
        return network
    if pool_size < max_pool:
        return None
    top_count, top = max((count, name) for name, count in counts.items())  # ties: the greatest name, as Redis
    return network if own >= top_count else top
