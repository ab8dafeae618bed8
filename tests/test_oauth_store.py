"""The grant store (sidecar/oauth/store_*.py): memory, real redis-server, and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sidecar.oauth import tokens as tk
from sidecar.oauth.model import AuthorizationCode, Client, DeviceAuthorization, Grant
from sidecar.oauth.store import GrantStore, MemoryGrantStore, RedisGrantStore
from tests.redis_procs import ClusterTopology, cluster_topology

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    with cluster_topology(tmp_path_factory.mktemp("oauth-cluster")) as topo:
        yield topo


@pytest.fixture(params=["memory", "redis", "cluster"])
async def grants(request: pytest.FixtureRequest, redis_server: str) -> AsyncIterator[GrantStore]:
    if request.param == "memory":
        yield MemoryGrantStore()
        return
    client: aioredis.Redis | RedisCluster
    if request.param == "redis":
        client = aioredis.from_url(redis_server)
        await client.flushdb()
    else:
        topo: ClusterTopology = request.getfixturevalue("cluster")
        client = RedisCluster(host="127.0.0.1", port=topo.procs[0].port)
        await client.initialize()
    yield RedisGrantStore(client, f"t{time.monotonic_ns()}:")  # the cluster is shared by the module's tests
    await client.aclose()


def grant(sub: str = "alice", last: float | None = None) -> Grant:
    now = time.time() if last is None else last
    return Grant(
        grant_id=tk.new_grant_id(),
        sub=sub,
        user=f"{sub}@example.com",
        client_id="client-1",
        client_name="CLI",
        resource="http://127.0.0.1/mcp",
        resource_path="/mcp",
        scope="openid",
        session_sid="sid-" + sub,
        created_at=now,
        last_used_at=now,
        last_used_from="127.0.0.1",
        user_agent="test",
        expires_at=now + 3600,
    )


async def issue(store: GrantStore, g: Grant, used: str | None = None) -> tuple[str, str, str]:
    access, refresh = tk.token_hash(tk.mint(tk.ACCESS, g.grant_id)), tk.token_hash(tk.mint(tk.REFRESH, g.grant_id))
    outcome = await store.issue_tokens(
        g.grant_id, access, b"A" + access.encode(), 60, refresh, b"R", 120, used, time.time(), "10.0.0.1", "ua"
    )
    return outcome, access, refresh


async def test_rotation_replay_ends_the_whole_grant(grants: GrantStore) -> None:
    g = grant()
    await grants.create_grant(g, 60, 20)
    ok, a1, r1 = await issue(grants, g)
    assert ok == "ok" and await grants.access_record(g.grant_id, a1) == b"A" + a1.encode()
    assert (await issue(grants, g))[0] == "unknown"  # a second "first issue" (code replay race) is refused
    ok, a2, r2 = await issue(grants, g, used=r1)
    assert ok == "ok"
    assert await grants.refresh_record(g.grant_id, r1) is None  # the used one is gone
    assert await grants.refresh_record(g.grant_id, r2) == b"R"
    # An unknown token changes nothing.
    assert (await issue(grants, g, used=tk.token_hash("nope")))[0] == "unknown"
    assert await grants.get_grant(g.grant_id) is not None
    # The first refresh token again: replay ends the grant, its access tokens and its current refresh token.
    assert await grants.report_replay(g.grant_id, tk.token_hash("never issued")) is None
    assert (await issue(grants, g, used=r1))[0] == "replayed"
    assert await grants.get_grant(g.grant_id) is None
    for a in (a1, a2):
        assert await grants.access_record(g.grant_id, a) is None
    assert await grants.refresh_record(g.grant_id, r2) is None
    assert await grants.user_grants("alice") == []
    assert (await issue(grants, g, used=r2))[0] == "unknown"


async def rotate(store: GrantStore, g: Grant, used: str, answer: bytes, window: float) -> tuple[str, str]:
    access, refresh = tk.token_hash(tk.mint(tk.ACCESS, g.grant_id)), tk.token_hash(tk.mint(tk.REFRESH, g.grant_id))
    outcome = await store.issue_tokens(
        g.grant_id, access, b"A", 60, refresh, b"R", 120, used, time.time(), "10.0.0.1", "ua", answer, window
    )
    return outcome, refresh


async def test_a_rotation_keeps_its_answer_for_the_window_only_while_it_is_the_latest(grants: GrantStore) -> None:
    g = grant()
    await grants.create_grant(g, 60, 20)
    _, _, r1 = await issue(grants, g)
    ok, r2 = await rotate(grants, g, r1, b"sealed-1", 5)
    assert ok == "ok" and await grants.reused_rotation(g.grant_id, r1) == b"sealed-1"
    # the same old token again (a concurrent request that read its record before the rotation): "again",
    # and nothing changes: no new branch, the answer kept, r2 still the current one
    again, r_extra = await rotate(grants, g, r1, b"sealed-other", 5)
    assert again == "again"
    assert await grants.refresh_record(g.grant_id, r_extra) is None
    assert await grants.refresh_record(g.grant_id, r2) == b"R"
    assert await grants.reused_rotation(g.grant_id, r1) == b"sealed-1"
    assert await grants.reused_rotation(g.grant_id, r2) is None
    # the family moves on: r1's answer is forgotten, r1 is a replay again and ends the grant
    ok, r3 = await rotate(grants, g, r2, b"sealed-2", 5)
    assert ok == "ok" and await grants.reused_rotation(g.grant_id, r1) is None
    assert await grants.reused_rotation(g.grant_id, r2) == b"sealed-2"
    assert (await rotate(grants, g, r1, b"x", 5))[0] == "replayed"
    assert await grants.get_grant(g.grant_id) is None
    assert await grants.reused_rotation(g.grant_id, r2) is None  # ended with the grant
    assert await grants.refresh_record(g.grant_id, r3) is None


async def test_the_kept_answer_expires_with_the_window_and_zero_keeps_none(grants: GrantStore) -> None:
    g = grant()
    await grants.create_grant(g, 60, 20)
    _, _, r1 = await issue(grants, g)
    _, r2 = await rotate(grants, g, r1, b"sealed-1", 0.3)
    await asyncio.sleep(0.45)
    assert await grants.reused_rotation(g.grant_id, r1) is None
    assert (await rotate(grants, g, r1, b"x", 0.3))[0] == "replayed" and await grants.get_grant(g.grant_id) is None
    strict = grant()
    await grants.create_grant(strict, 60, 20)
    _, _, s1 = await issue(grants, strict)
    _, s2 = await rotate(grants, strict, s1, b"sealed", 0)
    assert await grants.reused_rotation(strict.grant_id, s1) is None
    assert (await rotate(grants, strict, s1, b"x", 5))[0] == "replayed"
    assert await grants.get_grant(strict.grant_id) is None


async def test_report_replay_of_a_rotated_token_ends_the_grant(grants: GrantStore) -> None:
    g = grant()
    await grants.create_grant(g, 60, 20)
    _, a1, r1 = await issue(grants, g)
    await issue(grants, g, used=r1)
    assert await grants.report_replay(g.grant_id, tk.token_hash("other")) is None
    ended = await grants.report_replay(g.grant_id, r1)
    assert ended is not None and ended.grant_id == g.grant_id
    assert await grants.get_grant(g.grant_id) is None and await grants.user_grants("alice") == []


async def test_end_grant_removes_codes_tokens_and_index(grants: GrantStore) -> None:
    g, other = grant(), grant()
    await grants.create_grant(g, 60, 20)
    await grants.create_grant(other, 60, 20)
    code = AuthorizationCode(g.grant_id, "client-1", "http://127.0.0.1:1/cb", "x" * 43, g.resource, "", b"k", 0.0)
    await grants.put_code("c1", code, 60)
    _, a1, r1 = await issue(grants, g)
    _, oa, _ = await issue(grants, other)
    ended = await grants.end_grant(g.grant_id)
    assert ended is not None and ended.grant_id == g.grant_id
    assert await grants.end_grant(g.grant_id) is None
    assert await grants.take_code("c1", g.grant_id) == (None, False)
    assert await grants.access_record(g.grant_id, a1) is None
    assert await grants.refresh_record(g.grant_id, r1) is None
    assert [x.grant_id for x in await grants.user_grants("alice")] == [other.grant_id]
    assert await grants.access_record(other.grant_id, oa) is not None


async def test_code_is_single_use_and_second_use_is_reported(grants: GrantStore) -> None:
    g = grant()
    await grants.create_grant(g, 60, 20)
    code = AuthorizationCode(g.grant_id, "client-1", "http://127.0.0.1:1/cb", "c" * 43, g.resource, "", b"\x00k", 9.5)
    await grants.put_code("h", code, 60)
    assert await grants.take_code("h", g.grant_id) == (code, True)
    assert await grants.take_code("h", g.grant_id) == (code, False)
    assert await grants.take_code("h", g.grant_id) == (code, False)
    assert await grants.take_code("other", g.grant_id) == (None, False)
    # A code for a grant that is gone is never stored.
    await grants.end_grant(g.grant_id)
    await grants.put_code("h2", code, 60)
    assert await grants.take_code("h2", g.grant_id) == (None, False)


async def test_per_user_limit_ends_least_recently_used(grants: GrantStore) -> None:
    now = time.time()
    first, second, third = grant(last=now - 30), grant(last=now - 20), grant(last=now - 10)
    for g in (first, second, third):
        assert await grants.create_grant(g, 60, 3) == []
    await grants.touch_grant(
        first.grant_id, "alice", now - 5, "10.1.1.1"
    )  # the oldest is used again: second is now LRU
    fourth = grant(last=now)
    ended = await grants.create_grant(fourth, 60, 3)
    assert [g.grant_id for g in ended] == [second.grant_id]
    listed = await grants.user_grants("alice")
    assert [g.grant_id for g in listed] == [fourth.grant_id, first.grant_id, third.grant_id]
    assert listed[1].last_used_from == "10.1.1.1"
    assert await grants.user_grants("bob") == []
    assert {g.grant_id for g in await grants.end_user_grants("alice")} == {g.grant_id for g in listed}
    assert await grants.user_grants("alice") == []


async def test_unredeemed_grants_are_handed_out_once_when_abandoned(grants: GrantStore) -> None:
    now = time.time()
    redeemed, abandoned, sealed = grant(), grant(), grant()
    sealed = Grant(**{**sealed.__dict__, "sealed_key": b"\x00\xffkey"})
    for g in (redeemed, abandoned, sealed):
        await grants.create_grant(g, 60, 20)
    await issue(grants, redeemed)
    assert await grants.take_abandoned(now + 30) == []  # not due yet
    assert await grants.get_grant(abandoned.grant_id) is not None
    due = await grants.take_abandoned(now + 61)
    assert sorted(due) == sorted(g.grant_id for g in (redeemed, abandoned, sealed))
    assert await grants.take_abandoned(now + 61) == []  # each is handed out once (one replica ends it)
    assert await grants.end_unredeemed(redeemed.grant_id) is None  # tokens were issued: it lives on
    assert await grants.get_grant(redeemed.grant_id) is not None
    ended = await grants.end_unredeemed(sealed.grant_id)
    assert ended is not None and ended.sealed_key == b"\x00\xffkey"  # what the caller opens to revoke upstream
    assert (await grants.end_unredeemed(abandoned.grant_id)) == abandoned
    assert await grants.get_grant(abandoned.grant_id) is None
    assert await grants.end_unredeemed(abandoned.grant_id) is None
    assert [g.grant_id for g in await grants.user_grants("alice")] == [redeemed.grant_id]


@pytest.mark.parametrize("grants", ["redis", "cluster"], indirect=True)  # the memory store has no keys to check
async def test_every_redis_key_has_a_ttl(grants: GrantStore) -> None:
    assert isinstance(grants, RedisGrantStore)
    g = grant()
    await grants.create_grant(g, 60, 20)
    code = AuthorizationCode(g.grant_id, "c", "http://x/cb", "c" * 43, g.resource, "", b"k", 0.0)
    await grants.put_code("h", code, 60)
    _, _, r1 = await issue(grants, g)
    await issue(grants, g, used=r1)
    device = DeviceAuthorization("dh", "ABCDEFGH", "c", g.resource, "", time.time() + 60, 5.0, "pending")
    await grants.put_device(device, 60)
    await grants.put_pending("x", b"y", 60)
    client = grants._r  # the test's own client
    keys = [k async for k in client.scan_iter(match=grants._p + "*")]
    assert len(keys) >= 8
    for key in keys:
        assert await client.pttl(key) > 0, key


async def test_device_states_compare_and_set_and_slow_down(grants: GrantStore) -> None:
    now = time.time()
    device = DeviceAuthorization(
        tk.token_hash("dc"), "WXYZ2345", "client-1", "http://r/mcp", "", now + 60, 5.0, "pending"
    )
    assert await grants.put_device(device, 60)
    assert not await grants.put_device(device, 60)  # user code taken
    assert await grants.device_by_user_code("WXYZ2345") == device
    first, fast = await grants.poll_device(device.device_code_hash, now)
    assert first is not None and not fast and first.interval == 5.0
    second, fast = await grants.poll_device(device.device_code_hash, now + 1)
    assert second is not None and fast and second.interval == 10.0  # RFC 8628: 5 s more
    third, fast = await grants.poll_device(device.device_code_hash, now + 12)
    assert third is not None and not fast and third.interval == 10.0
    approved = DeviceAuthorization(**{**device.__dict__, "status": "approved", "grant_id": "g", "wrapped_key": b"w"})
    assert await grants.update_device(approved, "pending")
    assert not await grants.update_device(approved, "pending")  # only once
    got = await grants.device_by_code_hash(device.device_code_hash)
    assert got is not None and got.status == "approved" and got.wrapped_key == b"w"
    assert got.last_poll_at == pytest.approx(now + 12, abs=0.001) and got.interval == 10.0  # poll state kept
    redeemed = DeviceAuthorization(**{**got.__dict__, "status": "redeemed"})
    assert await grants.update_device(redeemed, "approved")
    assert not await grants.update_device(redeemed, "approved")
    assert await grants.poll_device("missing", now) == (None, False)


async def test_pending_take_is_once(grants: GrantStore) -> None:
    await grants.put_pending("k", b"v", 60)
    assert await grants.get_pending("k") == b"v"
    assert await grants.take_pending("k") == b"v"
    assert await grants.take_pending("k") is None


def _new_client(n: int) -> Client:
    return Client(f"new-{n}-{time.monotonic_ns()}", "CLI", (), ("refresh_token",), "none", None, time.time(), "ip")


async def _kept(grants: GrantStore, clients: list[Client]) -> list[bool]:
    return [await grants.get_client(c.client_id) == c for c in clients]


async def test_unused_clients_are_short_lived_and_promoted_by_a_grant(grants: GrantStore) -> None:
    first, second, third = _new_client(1), _new_client(2), _new_client(3)
    assert await grants.put_new_client(first, "A", 60, 2, 2) is None
    assert await grants.put_new_client(second, "B", 60, 2, 2) is None
    await grants.touch_client(first.client_id, 86400)  # anonymous use does not extend an unused client
    await grants.promote_client(first.client_id, 86400)  # a grant does, and frees its place
    assert await grants.put_new_client(third, "C", 60, 2, 2) is None  # room: nobody forgotten
    await grants.promote_client(first.client_id, 86400)  # twice: nothing more happens
    assert await _kept(grants, [first, second, third]) == [True, True, True]
    fourth = _new_client(4)
    # full, and C holds as many as anyone: its own oldest makes room
    assert await grants.put_new_client(fourth, "C", 60, 2, 2) == third.client_id
    assert await _kept(grants, [first, second, third, fourth]) == [True, True, False, True]
    if isinstance(grants, RedisGrantStore):
        ttl = {c.client_id: await grants._r.pttl(grants._p + "cl:" + c.client_id) for c in (first, second)}
        assert ttl[first.client_id] > 80_000_000 and 0 < ttl[second.client_id] <= 60_000
        pool = grants._p + "{cn}"  # an expired unused client frees its place without anyone promoting it
        await grants._r.zadd(pool, {second.client_id: time.time() - 1, fourth.client_id: time.time() - 1})
        assert await grants.put_new_client(_new_client(5), "D", 60, 2, 2) is None
        assert await grants._r.zcard(pool) == 1 and await grants._r.zcard(grants._p + "{cn}:h") == 1


async def test_one_network_holds_at_most_its_share_and_forgets_its_own_oldest(grants: GrantStore) -> None:
    mine = [_new_client(i) for i in range(5)]
    forgotten = [await grants.put_new_client(c, "10.0.0.0/24", 60, 100, 3) for c in mine]
    assert forgotten == [None, None, None, mine[0].client_id, mine[1].client_id]
    assert await _kept(grants, mine) == [False, False, True, True, True]
    other = _new_client(9)  # another network is not touched by it
    assert await grants.put_new_client(other, "10.0.1.0/24", 60, 100, 3) is None


async def test_a_full_pool_takes_from_the_biggest_holder_until_the_split_is_even(grants: GrantStore) -> None:
    flood = [_new_client(i) for i in range(4)]
    for c in flood:
        assert await grants.put_new_client(c, "flood", 60, 5, 4) is None
    lone = _new_client(10)
    assert await grants.put_new_client(lone, "lone", 60, 5, 4) is None  # the pool is full now: 4 + 1
    newcomer = [_new_client(20 + i) for i in range(3)]
    forgotten = [await grants.put_new_client(c, "new", 60, 5, 4) for c in newcomer]
    # flood holds 4 then 3 (more than new's 1 or 2): its oldest go; then new holds as many as anyone: its own
    assert forgotten == [flood[0].client_id, flood[1].client_id, newcomer[0].client_id], forgotten
    assert await _kept(grants, [lone, *flood, *newcomer]) == [True, False, False, True, True, False, True, True]
    again = _new_client(30)  # the flood registers again: it holds 2 like new, so it forgets its own oldest
    assert await grants.put_new_client(again, "flood", 60, 5, 4) == flood[2].client_id
    assert await _kept(grants, [lone]) == [True]  # the smallest holder is never the one to give way


async def test_a_client_granted_meanwhile_is_not_deleted_by_the_pool(grants: GrantStore) -> None:
    """The pool forgets a client and a user grants it access at the same moment: the grant wins."""
    first, second = _new_client(1), _new_client(2)
    assert await grants.put_new_client(first, "A", 60, 1, 1) is None
    if isinstance(grants, RedisGrantStore):  # the grant's promotion lands between the pool's two steps
        await grants._promote(keys=[grants._p + "cl:" + first.client_id], args=[86_400_000])
    else:
        await grants.promote_client(first.client_id, 86400)
    await grants.put_new_client(second, "A", 60, 1, 1)
    assert await _kept(grants, [first, second]) == [True, True]


async def test_concurrent_registrations_never_leave_a_client_outside_the_pool(grants: GrantStore) -> None:
    """Registrations landing at once (many workers or replicas): every client record alive is one the pool
    counts, so the bound holds. Fails when the record is written after the pool admits it: a registration
    forgotten by a concurrent one before its record existed kept a record nobody counts."""
    flood = [_new_client(i) for i in range(30)]
    await asyncio.gather(*(grants.put_new_client(c, "10.9.9.0/24", 60, 100, 2) for c in flood))
    alive = [c for c, kept in zip(flood, await _kept(grants, flood), strict=True) if kept]
    assert len(alive) == 2, f"{len(alive)} unused clients alive from a network whose share is 2"
    again = [_new_client(100 + i) for i in range(30)]  # a full pool, many networks at once
    await asyncio.gather(*(grants.put_new_client(c, f"10.8.{i}.0/24", 60, 5, 2) for i, c in enumerate(again)))
    assert sum(await _kept(grants, [*flood, *again])) <= 5


async def test_promoting_a_client_the_pool_forgot_says_so(grants: GrantStore) -> None:
    """The sign-in finisher read the client, then a registration elsewhere forgot it: the promotion must say
    the client is gone, so no grant (holding the user's upstream tokens) is made for a client nobody can use.
    Failed before: the promotion answered nothing either way."""
    first, second = _new_client(1), _new_client(2)
    assert await grants.put_new_client(first, "A", 60, 1, 1) is None
    assert await grants.put_new_client(second, "A", 60, 1, 1) == first.client_id
    assert await grants.promote_client(first.client_id, 86400) is False
    assert await grants.promote_client(second.client_id, 86400) is True
    assert await grants.promote_client(second.client_id, 86400) is True  # already used: still there
    assert await _kept(grants, [first, second]) == [False, True]


async def test_memory_and_redis_pools_forget_the_same_clients(redis_server: str) -> None:
    """One random sequence of registrations (a flood network, a few others, newcomers) and grants, played on
    the memory store and on a real redis-server: the same client is forgotten at every step."""
    import random

    rng = random.Random(7)
    client = aioredis.from_url(redis_server)
    stores: list[GrantStore] = [MemoryGrantStore(), RedisGrantStore(client, f"parity{time.monotonic_ns()}:")]
    ids: list[str] = []
    nets: dict[str, str] = {}
    reasons: set[str] = set()  # which rule forgot someone: a network at its share, or the biggest holder
    try:
        for step in range(400):
            if ids and rng.random() < 0.1:
                promoted = rng.choice(ids)
                answers = [await s.promote_client(promoted, 3600) for s in stores]
                assert answers[0] == answers[1], (step, promoted, answers)
                continue
            net = rng.choice(["flood"] * 6 + ["a", "b", "c", f"new{step % 40}"])
            c = _new_client(step)
            ids.append(c.client_id)
            nets[c.client_id] = net
            forgotten = [await s.put_new_client(c, net, 600, 12, 5) for s in stores]
            assert forgotten[0] == forgotten[1], (step, net, forgotten)
            if forgotten[0] is not None:
                reasons.add("own" if nets[forgotten[0]] == net else "biggest")
        assert reasons == {"own", "biggest"}
        kept = [await s.get_client(i) is not None for s in stores for i in ids]
        assert kept[: len(ids)] == kept[len(ids) :]
    finally:
        await client.aclose()


async def test_a_clients_live_device_authorizations_are_bounded(grants: GrantStore) -> None:
    now = time.time()
    client_id = f"dev-{time.monotonic_ns()}"
    assert await grants.reserve_device(client_id, "h1", now + 60, 2)
    assert await grants.reserve_device(client_id, "h2", now + 60, 2)
    assert not await grants.reserve_device(client_id, "h3", now + 60, 2)
    assert await grants.reserve_device("another-" + client_id, "h3", now + 60, 2)  # per client
    if isinstance(grants, RedisGrantStore):  # an expired one frees its place
        await grants._r.zadd(grants._p + "dc:" + client_id, {"h1": now - 1})
        assert await grants.reserve_device(client_id, "h4", now + 60, 2)
