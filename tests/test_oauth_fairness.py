"""Abuse bounds that must not turn into lock-outs: separate budgets for /oauth2/token and /oauth2/revoke, and
a fair share of the unused-client pool per network, against a real redis-server shared by two replicas.

Each connection really comes from its own 127.x address (``_client``), so the per-address and per-network
counting is the sidecar's own reading of the peer address; nothing is set by hand.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.config_load import load_config
from sidecar.errors import ConfigError
from sidecar.oauth.unused_pool import network_of, victim_network
from sidecar.store import RedisStore
from tests.stack import browser, sign_in
from tests.test_config import BASE
from tests.test_oauth_authorize import code_flow, oauth_stack, redeem, register
from tests.test_signin_hardening import _client

pytestmark = pytest.mark.timeout(120)


# --- settings ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--oauth-revocation-rate-limit", "--oauth-unused-clients-per-network"])
@pytest.mark.parametrize(
    "value", ["-1", "abc", "1.5", "", " ", "1e3", "0x10", "1000001", "true", "10 20", "٣", "1_000", "１２"]
)
def test_bad_budget_values_are_refused_with_one_line_naming_the_option(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([*BASE, flag, value], {})
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(flag + ":"), lines


@pytest.mark.parametrize("value", ['"6 0"', "[60]", "-3", "6e1", "true", '"sixty"', "{a = 1}"])
def test_bad_budget_values_in_the_environment_or_toml_are_refused_too(value: str, tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(f"oauth-revocation-rate-limit = {value}\n")
    for args, env in (
        (["--config", str(toml)], {}),
        ([], {"SIDECAR_OAUTH_UNUSED_CLIENTS_PER_NETWORK": value}),
        ([], {"OAUTH2_PROXY_OAUTH_REVOCATION_RATE_LIMIT": value}),
    ):
        with pytest.raises(ConfigError) as err:
            load_config([*BASE, *args], env)
        lines = str(err.value).splitlines()
        assert len(lines) == 1 and ("revocation-rate-limit" in lines[0] or "per-network" in lines[0]), lines


@pytest.mark.parametrize(
    "line",
    [
        "oauth-revocation-rate-limit = 99999999999999999999999999999999999999999999999999" + "9" * 300,
        "oauth-unused-clients-per-network = -99999999999999999999999999999999999999999999999" + "9" * 300,
        "oauth-unused-client-ttl = 99999999999999999999999999999999999999999999999999" + "9" * 300,
    ],
)
def test_a_number_too_big_for_a_float_in_toml_is_one_line_not_a_traceback(line: str, tmp_path: Path) -> None:
    """TOML integers have no size limit in Python's reader; the bound check turned them into a float and an
    OverflowError escaped build_config (a traceback at start-up, not one line naming the option)."""
    toml = tmp_path / "sidecar.toml"
    toml.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config([*BASE, "--config", str(toml)], {})
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("--" + line.split(" ")[0] + ":"), lines


@pytest.mark.parametrize("port", ["٨٠٨٠", "８０８０", "²", "8_080", " 8080", "+8080"])
def test_an_address_port_takes_ascii_digits_only(port: str) -> None:
    """``str.isdigit`` let other scripts' digits through (``٨٠٨٠`` listened on 8080, ``²`` was a traceback)."""
    for flag in ("--http-address", "--metrics-address"):
        with pytest.raises(ConfigError) as err:
            load_config([*BASE, flag, "127.0.0.1:" + port], {})
        lines = str(err.value).splitlines()
        assert len(lines) == 1 and lines[0].startswith(flag + ":"), lines


def test_budget_defaults_and_the_share_is_checked_against_the_pool() -> None:
    config = load_config(BASE, {})
    assert (config.oauth_token_rate_limit, config.oauth_revocation_rate_limit) == (60, 60)
    assert (config.oauth_unused_clients_max, config.oauth_unused_clients_per_network) == (1000, 20)
    with pytest.raises(ConfigError, match="--oauth-unused-clients-per-network: must be at least 1"):
        load_config([*BASE, "--oauth-unused-clients-per-network", "0"], {})
    with pytest.raises(ConfigError, match="--oauth-unused-clients-per-network: must not exceed"):
        load_config([*BASE, "--oauth-unused-clients-max", "5", "--oauth-unused-clients-per-network", "6"], {})
    small = load_config([*BASE, "--oauth-unused-clients-max", "5"], {})  # the default share never binds there
    assert small.oauth_unused_clients_per_network == 20
    assert small.replace(oauth_unused_clients_max="4").oauth_unused_clients_max == 4  # nor when changed later
    with pytest.raises(ConfigError, match="--oauth-unused-clients-per-network: must not exceed"):
        small.replace(oauth_unused_clients_per_network="6")
    env = {"SIDECAR_OAUTH_REVOCATION_RATE_LIMIT": "0"}  # 0 turns the limit off, as for the other budgets
    assert load_config(BASE, env).oauth_revocation_rate_limit == 0


def test_durations_and_numbers_take_ascii_digits_only() -> None:
    for args in (["--oauth-unused-client-ttl", "٣٠m"], ["--oauth-unused-client-ttl", "１h"], ["--workers", "٢"]):
        with pytest.raises(ConfigError, match=args[0]):
            load_config([*BASE, *args], {})
    assert load_config([*BASE, "--oauth-unused-client-ttl", "30m"], {}).oauth_unused_client_ttl == 1800


# --- networks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("203.0.113.255", "203.0.113.0/24"),
        ("203.0.114.1", "203.0.114.0/24"),
        ("2001:db8:1:2::9", "2001:db8:1::/48"),
        ("2001:db8:1:ffff:ffff:ffff:ffff:ffff", "2001:db8:1::/48"),  # every /64 of a site: one network
        ("2001:db8:2::1", "2001:db8:2::/48"),
        ("::ffff:203.0.113.9", "203.0.113.0/24"),  # IPv4-mapped: counted as the IPv4 address
        ("::1", "::/48"),
        # IPv6 forms carrying an IPv4 client count as its /24: else 6to4 gives one /48 per IPv4 address, Teredo
        # one per server address (the sender picks it), and a translator's prefix lumps all of IPv4 together
        ("2002:cb00:7107::1", "203.0.113.0/24"),  # 6to4 of 203.0.113.7
        ("2002:cb00:7108:5::1", "203.0.113.0/24"),  # another address of that /24: the same network
        ("2001:0:4136:e378:8000:63bf:34ff:8ef8", "203.0.113.0/24"),  # Teredo: client 203.0.113.7 (obfuscated)
        ("2001:0:ffff:1:8000:63bf:34ff:8ef8", "203.0.113.0/24"),  # the same client through another server
        ("64:ff9b::203.0.113.9", "203.0.113.0/24"),  # NAT64 well-known prefix (RFC 6052)
        ("64:ff9b::198.51.100.9", "198.51.100.0/24"),  # another IPv4 client behind it: another network
        ("::ffff:0:203.0.113.9", "203.0.113.0/24"),  # SIIT IPv4-translated (RFC 2765)
        ("fe80::1%eth0", "fe80::/48"),
        ("/run/sidecar.sock", "/run/sidecar.sock"),  # not an IP address: its own network
        ("", ""),
    ],
)
def test_a_registration_counts_against_its_network(address: str, network: str) -> None:
    assert network_of(address) == network


def test_the_victim_is_the_own_network_at_its_share_else_the_biggest_holder_of_a_full_pool() -> None:
    assert victim_network({"a": 3}, "a", 3, 100, 3) == "a"
    assert victim_network({"a": 2}, "a", 2, 100, 3) is None
    assert victim_network({"a": 3, "b": 1}, "c", 4, 4, 3) == "a"
    assert victim_network({"a": 2, "b": 2}, "b", 4, 4, 3) == "b"  # as big as anyone: its own oldest
    assert victim_network({"a": 2, "b": 2}, "c", 4, 4, 3) == "b"  # ties: the greatest name, as Redis orders them


# --- over HTTP, two replicas, one Redis ---------------------------------------------------------------------
async def _post(client: aiohttp.ClientSession, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with client.post(url, data=form) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1 and body["error"] == "too_many_requests"
        return resp.status, body


async def test_revoking_many_tokens_never_holds_up_a_refresh_from_the_same_address(redis_url: str) -> None:
    stores = [RedisStore(aioredis.from_url(redis_url), prefix="budget:") for _ in range(2)]
    limits = {"oauth_token_rate_limit": "3", "oauth_revocation_rate_limit": "2"}  # bursts 6 and 4
    try:
        async with oauth_stack(stores[0], **limits) as st, browser() as alice, _client("127.0.0.1") as cli:
            other = await st.add_sidecar(stores[1], oauth_server="true", oauth_resource="/mcp", **limits)
            bases = (st.base, other)
            await sign_in(alice, st.base)
            reg = await register(st.base)
            query, verifier = await code_flow(st.base, reg["client_id"], alice)
            status, tokens = await redeem(st.base, reg["client_id"], query["code"][0], verifier)  # 1 of 6
            assert status == 200, tokens
            bogus = {"client_id": reg["client_id"], "token": "scr.not-a-token"}
            revokes = [(await _post(cli, bases[i % 2] + "/oauth2/revoke", bogus))[0] for i in range(6)]
            assert revokes == [200] * 4 + [429] * 2, revokes  # the revocation budget, across both replicas
            form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
            status, body = await _post(cli, other + "/oauth2/token", {**form, "client_id": reg["client_id"]})
            assert status == 200, body  # the same address still refreshes
            stale = {"grant_type": "refresh_token", "refresh_token": "scr.x", "client_id": reg["client_id"]}
            spent = [(await _post(cli, bases[i % 2] + "/oauth2/token", stale))[0] for i in range(5)]
            assert spent == [400] * 4 + [429], spent  # 1 + 1 + 4 = the token burst of 6; then refused
            async with _client("127.0.10.1") as elsewhere:  # and the other way round, from another address
                spent = [(await _post(elsewhere, bases[i % 2] + "/oauth2/token", stale))[0] for i in range(7)]
                assert spent == [400] * 6 + [429], spent
                status, _ = await _post(elsewhere, other + "/oauth2/revoke", bogus)
                assert status == 200
    finally:
        for store in stores:
            await store.close()


async def _register_from(address: str, base: str, headers: dict[str, str] | None = None) -> str:
    body = {"redirect_uris": ["http://127.0.0.1:8123/cb"], "token_endpoint_auth_method": "none"}
    async with _client(address) as http, http.post(base + "/oauth2/register", json=body, headers=headers) as resp:
        assert resp.status == 201, (address, resp.status, await resp.text())  # never refused for everyone
        return str((await resp.json())["client_id"])


async def _consistent(raw: aioredis.Redis, size: int) -> None:
    """The pool's four views agree: ids by expiry, id -> network, count per network, each network's ids; and
    every id in it has its "u:" (unused) record."""
    ids = {m.decode() for m in await raw.zrange("sc:oa:{cn}", 0, -1)}
    where = {k.decode(): v.decode() for k, v in (await raw.hgetall("sc:oa:{cn}:w")).items()}
    held = {k.decode(): int(v) for k, v in await raw.zrange("sc:oa:{cn}:h", 0, -1, withscores=True)}
    assert len(ids) == size and set(where) == ids and sum(held.values()) == size, (ids, where, held)
    for net, count in held.items():
        assert {m.decode() for m in await raw.zrange("sc:oa:{cn}:n:" + net, 0, -1)} == {
            i for i, n in where.items() if n == net
        } and count == sum(1 for n in where.values() if n == net)
    for client_id in ids:
        assert (await raw.get("sc:oa:cl:" + client_id) or b"").startswith(b"u:"), client_id


async def test_a_full_pool_still_lets_a_newcomer_register_and_keeps_its_client(redis_url: str) -> None:
    raw = aioredis.from_url(redis_url)
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    pool = {"oauth_unused_clients_max": "8", "oauth_unused_clients_per_network": "3"}
    pool |= {"oauth_registration_rate_limit": "1000"}  # the per-address rate is not what is tested here
    try:
        async with oauth_stack(stores[0], **pool) as st, browser() as alice:
            other = await st.add_sidecar(stores[1], oauth_server="true", oauth_resource="/mcp", **pool)
            bases = (st.base, other)

            async def counts() -> dict[str, int]:
                held = await raw.zrange("sc:oa:{cn}:h", 0, -1, withscores=True)
                return {k.decode(): int(v) for k, v in held}

            ids = [await _register_from(f"127.1.1.{i % 5 + 1}", bases[i % 2]) for i in range(10)]  # five addresses
            assert await counts() == {"127.1.1.0/24": 3}  # one network: its share, its newest three
            assert [await raw.exists("sc:oa:cl:" + c) for c in ids] == [0] * 7 + [1] * 3
            for net in (2, 3, 4):  # more networks fill the pool (8): it settles at an even split
                for i in range(10):
                    await _register_from(f"127.1.{net}.{i + 1}", bases[i % 2])
            held = await counts()
            assert sum(held.values()) == 8 and max(held.values()) - min(held.values()) <= 1, held
            assert len([k async for k in raw.scan_iter(match="sc:oa:cl:*")]) == 8
            await sign_in(alice, st.base)
            newcomer = (await register(st.base))["client_id"]  # from 127.0.0.1: a network holding nothing
            flood = [  # the flood goes on from every network at once, racing through both replicas
                _register_from(f"127.1.{net}.{i + 1}", bases[(net + i) % 2]) for net in (1, 2, 3, 4) for i in range(10)
            ]
            await asyncio.gather(*flood)
            assert await raw.exists("sc:oa:cl:" + newcomer) == 1
            await _consistent(raw, 8)
            query, verifier = await code_flow(st.base, newcomer, alice)  # and it works: consent, code, tokens
            status, tokens = await redeem(other, newcomer, query["code"][0], verifier)
            assert status == 200 and tokens["refresh_token"], tokens
            assert "127.0.0.0/24" not in await counts()  # granted: no longer in the unused pool
            await _consistent(raw, 7)
    finally:
        for store in stores:
            await store.close()
        await raw.aclose()


async def test_forged_forwarding_headers_do_not_spread_one_address_over_many_networks(redis_url: str) -> None:
    """Without --reverse-proxy the peer address is the one counted: a client naming other addresses in
    X-Forwarded-For or X-Real-IP still holds only its own network's share."""
    raw = aioredis.from_url(redis_url)
    store = RedisStore(aioredis.from_url(redis_url))
    pool = {"oauth_unused_clients_max": "50", "oauth_unused_clients_per_network": "3"}
    try:
        async with oauth_stack(store, oauth_registration_rate_limit="1000", **pool) as st:

            def forged(i: int) -> dict[str, str]:
                return [
                    {"X-Forwarded-For": f"203.0.{i}.1"},
                    {"X-Real-IP": f"198.51.{i}.7"},
                    {"X-Forwarded-For": f"2001:db8:{i}::1, 203.0.113.{i}"},
                    {"Forwarded": f"for=192.0.{i}.2"},
                    {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
                ][i % 5]

            for i in range(20):
                await _register_from("127.1.9.1", st.base, forged(i))
            held = {k.decode(): int(v) for k, v in await raw.zrange("sc:oa:{cn}:h", 0, -1, withscores=True)}
            assert held == {"127.1.9.0/24": 3}, held
    finally:
        await store.close()
        await raw.aclose()


async def test_a_client_forgotten_during_its_users_sign_in_leaves_no_live_upstream_token() -> None:
    """The user allowed access, went to the provider, and meanwhile the pool forgot the client (here: its
    network registered again with a share of 1). The grant is refused ("registration expired"), and the
    refresh token the provider just issued for that grant is revoked: before, it was dropped and stayed
    valid at the provider (an offline_access token, for months)."""
    from urllib.parse import urljoin

    from tests.test_oauth_authorize import authorize_params, consent_page, form_fields, pkce

    async with oauth_stack(None, oauth_unused_clients_per_network="1") as st, browser() as alice:
        await sign_in(alice, st.base)
        reg = await register(st.base)
        page = await consent_page(alice, st.base, authorize_params(reg["client_id"], pkce()[1]))
        live = st.provider.live_refresh_tokens().get("alice", 0)
        fields = {**form_fields(page), "decision": "approve"}
        async with alice.post(st.base + "/oauth2/consent", data=fields, allow_redirects=False) as resp:
            assert resp.status in (302, 303), await resp.text()
            location = urljoin(str(resp.url), resp.headers["Location"])
        await register(st.base)  # the same network again: the first client is forgotten
        async with alice.get(location) as resp:  # the provider signs alice in and sends her back
            assert resp.status == 400 and "registration expired" in await resp.text(), resp.status
        assert st.provider.live_refresh_tokens().get("alice", 0) == live
