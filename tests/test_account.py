"""The account page's server side, with hand-made hostile requests (the person's clicks are in
tests/e2e/test_browser_pages.py): who may end which row, device cards, and the page kit's safety."""

from __future__ import annotations

import re

import aiohttp
import pytest

from sidecar import kit
from sidecar.devices import describe_device
from sidecar.store import SessionStore
from tests.stack import browser, sign_in
from tests.test_oauth_authorize import oauth_stack

HTML = {"Accept": "text/html"}
ROW = re.compile(
    r"<input type='hidden' name='csrf' value='([^']*)'><input type='hidden' name='kind' value='([^']*)'>"
    r"<input type='hidden' name='id' value='([^']*)'>"
)


@pytest.mark.parametrize(
    ("agent", "words"),
    [
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/150.0 Safari/537.36",
         "Chrome on Linux"),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Version/17.0 Safari/604.1",
         "Safari on iPhone"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36 Edg/120.0",
         "Edge on Windows"),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14.0; rv:128.0) Gecko/20100101 Firefox/128.0", "Firefox on macOS"),
        ("Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36", "Chrome on Android"),
        ("curl/8.5.0", "curl"),
        ("", "An unknown browser or program"),
        ("<script>\u202e", "An unknown browser or program"),
    ],
)  # fmt: skip
def test_devices_are_described_in_words(agent: str, words: str) -> None:
    assert describe_device(agent) == words


@pytest.mark.parametrize(
    "hostile",
    ["Backup tool \u202eelgoog.www", "a\u200bb", "x\u2066y\u2069", "\x1b[31mred", "<b>bold</b>", "a\u061cb", "\ufeffz"],
)
def test_names_are_isolated_escaped_and_show_their_invisible_characters(hostile: str) -> None:
    shown = kit.name(hostile)
    assert shown.startswith("<bdi>") and shown.endswith("</bdi>")
    inner = shown[5:-6]
    assert "<" not in inner and not any(ord(ch) < 32 or 0x200B <= ord(ch) <= 0x206F for ch in inner), shown
    assert "\u202e" not in shown and "\ufeff" not in shown


def test_every_page_has_the_skeleton_and_the_strict_policy() -> None:
    page = kit.document("T <x>", "<p>b</p>", banner="B <i>", footer="F", error=True)
    assert page.startswith("<!doctype html><html lang='en'>")
    assert "width=device-width" in page and page.count("<main>") == 1 and "<title>T &lt;x&gt;</title>" in page
    assert "B &lt;i&gt;" in page and "<script" not in page and " style=" not in page
    assert "script-src" not in kit.CSP and "default-src 'none'" in kit.CSP and "'unsafe-inline'" not in kit.CSP


async def rows(client: aiohttp.ClientSession, base: str) -> list[tuple[str, str, str]]:
    async with client.get(base + "/oauth2/account", headers=HTML) as resp:
        assert resp.status == 200, await resp.text()
        return ROW.findall(await resp.text())


async def test_account_rows_can_be_ended_only_by_their_own_user_from_their_own_page(store: SessionStore) -> None:
    async with oauth_stack(store) as st, browser() as alice, browser() as alice2, browser() as bob:
        base = st.base
        await sign_in(alice, base)
        await sign_in(alice2, base)
        st.provider.config(auto_login="bob")
        await sign_in(bob, base)
        st.provider.config(auto_login="alice")
        mine, bobs = await rows(alice, base), await rows(bob, base)
        assert len(mine) == 2 and len(bobs) == 1, (mine, bobs)
        csrf = mine[0][0]
        other = mine[1]  # alice's other browser (this browser is listed first)
        hostile = [
            ({"csrf": csrf, "kind": "session", "id": bobs[0][2]}, {}, 404),  # bob's session, alice's form
            ({"csrf": bobs[0][0], "kind": "session", "id": other[2]}, {}, 403),  # bob's CSRF token
            ({"csrf": "x" * 43, "kind": "session", "id": other[2]}, {}, 403),
            ({"kind": "session", "id": other[2]}, {}, 403),
            ({"csrf": csrf, "kind": "grant", "id": other[2]}, {}, 404),
            ({"csrf": csrf, "kind": "app", "id": "no-such-grant"}, {}, 404),
            ({"csrf": csrf, "kind": "session", "id": ""}, {}, 404),
            ({"csrf": csrf, "kind": "session", "id": other[2]}, {"Origin": "https://evil.example"}, 403),
            ({"csrf": csrf, "kind": "session", "id": other[2]}, {"Origin": "null", "Sec-Fetch-Site": "same-site"}, 403),
            ({"csrf": csrf, "kind": "session", "id": other[2]}, {"Sec-Fetch-Site": "cross-site"}, 403),
        ]
        for form, headers, status in hostile:
            async with alice.post(
                base + "/oauth2/account/revoke", data=form, headers=headers, allow_redirects=False
            ) as resp:
                assert resp.status == status, (form, headers, resp.status, await resp.text())
        async with alice.post(
            base + "/oauth2/account/revoke", data=b"\xff\xfe", headers={"Content-Type": "text/plain; charset=bogus"}
        ) as resp:
            assert resp.status in (400, 403), resp.status
        assert len(await rows(alice, base)) == 2 and len(await rows(bob, base)) == 1
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(base + "/oauth2/account") as resp:
                assert resp.status == 401 and (await resp.json())["error"] == "not signed in"
            async with anonymous.get(base + "/oauth2/account", headers=HTML, allow_redirects=False) as resp:
                assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start?rd=")
            async with anonymous.post(base + "/oauth2/account/revoke", data={"csrf": csrf, "id": other[2]}) as resp:
                assert resp.status == 401
        form = {"csrf": csrf, "kind": "session", "id": other[2]}
        async with alice.post(base + "/oauth2/account/revoke", data=form, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/oauth2/account"
        assert len(await rows(alice, base)) == 1
        async with alice2.get(base + "/oauth2/userinfo") as resp:
            assert resp.status == 401
        async with bob.get(base + "/oauth2/userinfo") as resp:
            assert resp.status == 200


async def test_device_cards_are_not_stored_in_clear(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from sidecar.store import RedisStore

    client = aioredis.from_url(redis_url)
    store = RedisStore(client)
    try:
        async with oauth_stack(store) as st, browser() as alice:
            await sign_in(alice, st.base)
            keys = [k for k in await client.keys("*") if b"acct:" in k]
            assert len(keys) == 1
            blob = await client.get(keys[0])
            assert b"Python" not in blob and b"127.0.0.1" not in blob and b"device" not in blob
            assert 0 < await client.pttl(keys[0]) <= st.configs[0].cookie_expire * 1000
    finally:
        await store.close()


async def _end_row(client: aiohttp.ClientSession, base: str, row: tuple[str, str, str]) -> str:
    form = {"csrf": row[0], "kind": row[1], "id": row[2]}
    async with client.post(base + "/oauth2/account/revoke", data=form, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        return resp.headers["Location"]


@pytest.mark.timeout(120)
async def test_ending_a_session_from_the_account_page_revokes_its_refresh_token_as_sign_out_does(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The proof is the dev provider's own count of the refresh tokens it would still honour, per provider
    quirk; without a revocation endpoint in discovery nothing is POSTed anywhere, and the log line says so."""
    import logging

    import redis.asyncio as aioredis

    from sidecar.oidc import NOT_REVOKED_FAILED, NOT_REVOKED_NO_ENDPOINT, REVOKED
    from sidecar.store import RedisStore
    from tests.provider_quirks import QUIRKS

    caplog.set_level(logging.INFO, logger="sidecar.events")
    stores = [RedisStore(aioredis.from_url(redis_url), prefix="acct-revoke:")]

    def outcomes() -> list[str]:
        events = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "account_revoked"]
        return [e.get("refresh_token", "") for e in events]

    try:
        async with oauth_stack(stores[0]) as st, browser() as keeper:
            await sign_in(keeper, st.base)
            for name in ("plain", "rotating", "no-rotation", "no-revocation-endpoint"):
                quirk = QUIRKS[name]
                st.provider.config({"revocation_endpoint": True, **quirk})
                revokes = quirk.get("revocation_endpoint", True)
                stores.append(RedisStore(aioredis.from_url(redis_url), prefix="acct-revoke:"))
                base = await st.add_sidecar(stores[-1], oauth_server="true", oauth_resource="/mcp")  # new discovery
                async with browser() as other:
                    await sign_in(other, base)
                    live = st.provider.live_refresh_tokens()["alice"]
                    calls = st.provider.stats()["revoke_calls"]
                    caplog.clear()
                    mine = await rows(keeper, base)  # the cookie jar sends the keeper's cookie to any port
                    assert len(mine) == 2, (name, mine)
                    assert await _end_row(keeper, base, mine[1]) == "/oauth2/account"  # the other browser
                    async with other.get(base + "/oauth2/userinfo") as resp:
                        assert resp.status == 401, name
                    after = st.provider.live_refresh_tokens().get("alice", 0)
                    assert after == (live - 1 if revokes else live), (name, live, after)
                    assert st.provider.stats()["revoke_calls"] == calls + (1 if revokes else 0), name
                    assert outcomes() == [REVOKED if revokes else NOT_REVOKED_NO_ENDPOINT], (name, caplog.text)
            st.provider.config(revocation_endpoint=True)
            for kind in ("500", "slow"):  # a failing or hanging revocation endpoint: the session still ends
                st.provider.break_endpoint("revoke", kind, delay=30.0 if kind == "slow" else 0.0)
                async with browser() as other:
                    await sign_in(other, st.base)
                    live = st.provider.live_refresh_tokens()["alice"]
                    caplog.clear()
                    mine = await rows(keeper, st.base)
                    assert await _end_row(keeper, st.base, mine[1]) == "/oauth2/account", kind
                    async with other.get(st.base + "/oauth2/userinfo") as resp:
                        assert resp.status == 401, kind
                    assert st.provider.live_refresh_tokens()["alice"] == live, kind  # not revoked, and said so
                    assert outcomes() == [NOT_REVOKED_FAILED], (kind, caplog.text)
                st.provider.clear_faults()
            live = st.provider.live_refresh_tokens()["alice"]
            this = await rows(keeper, st.base)  # this browser ends itself from its own page: signed out, revoked
            assert len(this) == 1
            assert await _end_row(keeper, st.base, this[0]) == "/oauth2/signed_out"
            assert st.provider.live_refresh_tokens().get("alice", 0) == live - 1
    finally:
        for store in stores:
            await store.close()


async def test_a_device_card_without_a_usable_session_key_still_ends_its_session_and_revokes_nothing(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cards written before the key was kept, or holding a key that does not open the record, or no key at
    all: the session still ends as before; nothing is sent to the provider and the log line says the token was
    not revoked because the record could not be opened (it said "none" before, as if there were no token)."""
    import base64
    import json
    import logging

    import redis.asyncio as aioredis

    from sidecar import crypto, devices
    from sidecar.account import NOT_OPENED
    from sidecar.sessions import user_key
    from sidecar.store import RedisStore

    caplog.set_level(logging.INFO, logger="sidecar.events")
    store = RedisStore(aioredis.from_url(redis_url), prefix="acct-old:")
    cards = [
        {"device": "Old card", "address": "192.0.2.1", "at": 1.0},
        {"device": "Wrong key", "address": "192.0.2.2", "at": 1.0, "key": base64.b64encode(b"k" * 32).decode()},
        {"device": "Short key", "address": "192.0.2.3", "at": 1.0, "key": base64.b64encode(b"k").decode()},
    ]
    try:
        async with oauth_stack(store) as st, browser() as keeper:
            await sign_in(keeper, st.base)
            config, index = st.configs[0], user_key(st.provider.users["alice"].sub)
            for card in cards:
                before = set(await store.user_sessions(index))
                async with browser() as other:
                    await sign_in(other, st.base)
                    (key,) = set(await store.user_sessions(index)) - before
                    sub = st.provider.users["alice"].sub
                    blob = crypto.encrypt(devices._card_key(config, sub), json.dumps(card).encode(), key.encode())
                    await store.put_outcome(devices.CARD + key, blob, 60)
                    live, calls = st.provider.live_refresh_tokens()["alice"], st.provider.stats()["revoke_calls"]
                    listed = await rows(keeper, st.base)
                    assert len(listed) == 2  # this browser first, then the other one
                    row = listed[1]
                    caplog.clear()
                    assert await _end_row(keeper, st.base, row) == "/oauth2/account"
                    async with other.get(st.base + "/oauth2/userinfo") as resp:
                        assert resp.status == 401, card
                    assert st.provider.stats()["revoke_calls"] == calls, card
                    assert st.provider.live_refresh_tokens()["alice"] == live, card  # stays valid upstream
                    events = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "account_revoked"]
                    assert [e.get("refresh_token") for e in events] == [NOT_OPENED], (card, caplog.text)
    finally:
        await store.close()


async def test_a_store_failing_after_the_session_ended_still_revokes_its_refresh_token(redis_url: str) -> None:
    """Redis takes the session's deletion, then refuses the write that clears its device card (a real
    redis-server whose ACL stops allowing writes to card keys at that point). The session is gone, so its
    refresh token must be revoked at the provider all the same, and the page answers as for an ended row:
    before, the card write came first and its failure (a 503) left the token valid upstream."""
    import redis.asyncio as aioredis

    from sidecar.store import RedisStore

    admin = aioredis.from_url(redis_url)
    user, prefix = f"acctfail{abs(hash(redis_url)) % 1000}", "acct-fail:"
    await admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "&*", "+@all")
    store = RedisStore(aioredis.from_url(redis_url.replace("redis://", f"redis://{user}:pw@")), prefix=prefix)
    try:
        async with oauth_stack(store) as st, browser() as keeper, browser() as other:
            await sign_in(keeper, st.base)
            await sign_in(other, st.base)
            mine = await rows(keeper, st.base)
            assert len(mine) == 2
            live = st.provider.live_refresh_tokens()["alice"]
            # every write still allowed but to the store's short-lived values that are device cards (o:acct:*)
            writable = [f"%W~{prefix}[^o]*", f"%W~{prefix}o[^:]*", f"%W~{prefix}o:[^a]*", "%W~[^a]*"]
            await admin.execute_command("ACL", "SETUSER", user, "resetkeys", "%R~*", *writable)
            form = {"csrf": mine[1][0], "kind": mine[1][1], "id": mine[1][2]}
            async with keeper.post(st.base + "/oauth2/account/revoke", data=form, allow_redirects=False) as resp:
                assert resp.status == 303, (resp.status, await resp.text())
            async with other.get(st.base + "/oauth2/userinfo") as resp:
                assert resp.status == 401
            assert st.provider.live_refresh_tokens().get("alice", 0) == live - 1
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()
        await store.close()
