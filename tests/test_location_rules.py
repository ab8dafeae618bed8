"""/oauth2/auth?allowed_groups=... : per-location rules as oauth2-proxy documents them, failing closed."""

from __future__ import annotations

import aiohttp
import pytest

from sidecar.location_rules import location_rules
from sidecar.store import MemoryStore
from tests.stack import browser, sign_in, stack

# alice@example.com, groups admins and staff (the development provider's alice)
CASES = [
    ("", 202),
    ("allowed_groups=admins", 202),
    ("allowed_groups=ops", 403),
    ("allowed_groups=ops,admins", 202),
    ("allowed_groups=ops&allowed_groups=staff", 202),
    ("allowed_groups=ADMINS", 403),  # group names are exact
    ("allowed_groups=admin", 403),
    ("allowed_emails=alice@example.com", 202),
    ("allowed_emails=ALICE@Example.com", 202),
    ("allowed_emails=bob@example.com", 403),
    ("allowed_emails=alice@example.com.evil", 403),
    ("allowed_email_domains=example.com", 202),
    ("allowed_email_domains=EXAMPLE.COM,other.org", 202),
    ("allowed_email_domains=*.example.com", 403),  # subdomains only
    ("allowed_email_domains=ample.com", 403),
    ("allowed_email_domains=*", 202),
    ("allowed_groups=admins&allowed_emails=bob@example.com", 403),  # every parameter must pass
    ("allowed_groups=admins&allowed_email_domains=example.com", 202),
    # a query the sidecar does not understand denies instead of being read as "no restriction"
    ("allowed_group=admins", 403),
    ("allowed_groups=", 403),
    ("allowed_groups=,,", 403),
    ("allowed_groups", 403),
    ("allowed_email_domains=not a domain", 403),
    ("rd=/x", 403),
    ("allowed_groups=admins&&", 403),
    ("allowed_groups=" + "a," * 3000, 403),
    # routed_host=$host ends an ingress-nginx auth-url (fronts.py reads it): never a rule; spelt otherwise, refused
    ("allowed_groups=admins&routed_host=x.example", 202),
    ("allowed_groups=ops&routed_host=x.example", 403),
    ("routed_host", 403),
]


@pytest.mark.parametrize(("query", "status"), CASES)
async def test_location_rules(query: str, status: int) -> None:
    async with stack(MemoryStore(), upstream="") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/auth?{query}") as resp:
            assert resp.status == status, await resp.text()
        async with aiohttp.ClientSession() as anonymous:  # not signed in: always 401, never 403
            async with anonymous.get(f"{st.base}/oauth2/auth?{query}") as resp:
                assert resp.status == 401


def test_routed_host_is_reserved_and_what_follows_it_is_never_a_rule() -> None:
    """nginx's $host fills the end of the auth-url and may hold "&" and "=": nothing after routed_host= is a
    rule (fronts.py refuses such a value, 400). routed_host spelt without "=" or percent-encoded is a
    misconfigured auth-url like an unknown parameter: nobody passes."""
    assert location_rules("routed_host=a.example") == location_rules("")
    assert location_rules("routed_host=") == location_rules("")
    assert location_rules("allowed_groups=ops&routed_host=a.example").groups == {"ops"}
    assert location_rules("allowed_groups=ops&routed_host=a.example&allowed_groups=admins").groups == {"ops"}
    assert location_rules("routed_host=a.example&max_age=0").max_age is None
    assert location_rules("allowed_groups=ops&routed_host=a&routed_host=b").problem is None  # fronts: 400
    for query in ("routed_host", "routed_host%3Da", "allowed_groups=ops&routed_host"):
        assert location_rules(query).problem is not None, query
    for query in ("routed%5Fhost=a.example", "allowed_groups=ops&routed%5fhost=a.example"):
        assert "routed_host" in str(location_rules(query).problem), query
    assert location_rules("allowed_groups=ops&&routed_host=a").problem is not None  # malformed before it
