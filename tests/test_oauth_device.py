"""The device authorization grant (RFC 8628): /oauth2/device_authorization and the /oauth2/device page."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

import aiohttp
import pytest

from sidecar.oauth.device import ALPHABET, normalise
from sidecar.store import SessionStore
from tests.stack import browser, sign_in
from tests.test_oauth_authorize import form_fields, oauth_stack, register

DEVICE = "urn:ietf:params:oauth:grant-type:device_code"


async def device_client(base: str, **meta: Any) -> dict[str, Any]:
    return await register(base, grant_types=[DEVICE, "refresh_token"], redirect_uris=None, **meta)


async def start_device(base: str, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/oauth2/device_authorization", data=form, headers=headers or {}) as resp:
            assert resp.headers["Cache-Control"] == "no-store"
            return resp.status, await resp.json()


async def poll(base: str, client_id: str, device_code: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": DEVICE, "device_code": device_code, "client_id": client_id}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/token", data=form) as resp:
        return resp.status, await resp.json()


async def enter_code(client: aiohttp.ClientSession, base: str, code: str) -> aiohttp.ClientResponse:
    async with client.get(f"{base}/oauth2/device") as resp:
        fields = form_fields(await resp.text())
    async with client.post(f"{base}/oauth2/device", data={**fields, "user_code": code}) as resp:
        await resp.read()
        return resp


async def consent(client: aiohttp.ClientSession, base: str, page: str, decision: str) -> str:
    async with client.post(f"{base}/oauth2/consent", data={**form_fields(page), "decision": decision}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


def test_user_codes_are_read_in_any_case_with_or_without_separators() -> None:
    assert normalise("bcdf-ghjk") == normalise("BCDF GHJK") == normalise(" bcdfghjk ") == "BCDFGHJK"
    for bad in ("BCDF-GHJ", "BCDF-GHJKL", "ABCD-EFGH", "BCDF-GHJ1", "BCDF_GHJK", "", "ＢCDF-GHJK"):
        assert normalise(bad) is None, bad
    assert not set("AEIOUY01") & set(ALPHABET)


async def test_device_flow_code_entry_consent_and_polling(store: SessionStore) -> None:
    async with oauth_stack(store, oauth_device_poll_interval="1s") as st, browser() as user:
        base = st.base
        reg = await device_client(base)
        status, answer = await start_device(base, {"client_id": reg["client_id"], "scope": "openid offline_access"})
        assert status == 200, answer
        assert re.fullmatch(f"[{ALPHABET}]{{4}}-[{ALPHABET}]{{4}}", answer["user_code"])
        assert answer["verification_uri"] == f"{base}/oauth2/device"
        assert answer["verification_uri_complete"] == f"{base}/oauth2/device?user_code={answer['user_code']}"
        assert answer["expires_in"] == 600 and answer["interval"] == 1
        status, pending = await poll(base, reg["client_id"], answer["device_code"])
        assert (status, pending["error"]) == (400, "authorization_pending")
        # verification_uri_complete: sign in first, then only a pre-filled form, never an approval
        async with user.get(answer["verification_uri_complete"]) as resp:
            page = await resp.text()
            assert resp.status == 200 and resp.url.path == "/oauth2/device"
            assert answer["user_code"] in page and "Allow" not in page
            assert resp.headers["X-Frame-Options"] == "DENY"
        typed = answer["user_code"].lower().replace("-", " ")
        resp = await enter_code(user, base, typed)
        assert resp.status == 200
        async with user.post(
            f"{base}/oauth2/device",
            data={**form_fields(page), "user_code": typed},
        ) as resp:
            page = await resp.text()
        assert "Allow" in page and "device" in page and f"{base}/mcp" in page
        done = await consent(user, base, page, "approve")
        assert "return to your device" in done
        await asyncio.sleep(1.1)
        status, tokens = await poll(base, reg["client_id"], answer["device_code"])
        assert status == 200, tokens
        assert tokens["access_token"].startswith("sca.") and tokens["refresh_token"]
        await asyncio.sleep(1.1)
        status, again = await poll(base, reg["client_id"], answer["device_code"])
        assert status == 400 and again["error"] in ("invalid_grant", "expired_token")
        # a used code is just a wrong code to the page
        resp = await enter_code(user, base, answer["user_code"])
        assert resp.status == 400


async def test_denied_device_gets_access_denied() -> None:
    async with oauth_stack() as st, browser() as user:
        reg = await device_client(st.base)
        _, answer = await start_device(st.base, {"client_id": reg["client_id"]})
        await sign_in(user, st.base)
        async with user.get(f"{st.base}/oauth2/device") as resp:
            fields = form_fields(await resp.text())
        async with user.post(f"{st.base}/oauth2/device", data={**fields, "user_code": answer["user_code"]}) as resp:
            page = await resp.text()
        assert "denied" in (await consent(user, st.base, page, "deny")).lower()
        status, body = await poll(st.base, reg["client_id"], answer["device_code"])
        assert (status, body["error"]) == (400, "access_denied")


async def test_wrong_codes_reveal_nothing_and_entry_is_rate_limited() -> None:
    async with oauth_stack() as st, browser() as user:
        reg = await device_client(st.base)
        _, answer = await start_device(st.base, {"client_id": reg["client_id"]})
        await sign_in(user, st.base)
        real = answer["user_code"]
        near = real[:-1] + ("Q" if real[-1] != "Q" else "R")  # one letter off (never the real code itself)
        wrong = [c for c in ("BCDF-GHJK", near) if c != real] + ["bcdf", "", "<script>", "A" * 40]
        texts = set()
        for code in wrong:
            resp = await enter_code(user, st.base, code)
            assert resp.status == 400
        async with user.get(f"{st.base}/oauth2/device") as resp:
            fields = form_fields(await resp.text())
        for code in wrong[:3]:
            async with user.post(f"{st.base}/oauth2/device", data={**fields, "user_code": code}) as resp:
                text = await resp.text()
                texts.add(re.sub(r"value='[^']*'", "", text))
                if resp.status == 429:
                    break
        assert len(texts) == 1  # the same page whatever was wrong
        statuses = []
        for _ in range(4):
            async with user.post(
                f"{st.base}/oauth2/device",
                data={**fields, "user_code": answer["user_code"]},
            ) as resp:
                statuses.append(resp.status)
        assert statuses[-1] == 429  # ten entries a minute per session: even the right code must wait


async def test_code_entry_needs_a_session_csrf_and_same_origin() -> None:
    async with oauth_stack() as st, browser() as user, browser() as other:
        reg = await device_client(st.base)
        _, answer = await start_device(st.base, {"client_id": reg["client_id"]})
        async with user.get(f"{st.base}/oauth2/device", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start?rd=")
        await sign_in(user, st.base)
        await sign_in(other, st.base)
        async with other.get(f"{st.base}/oauth2/device") as resp:
            foreign = form_fields(await resp.text())
        code = answer["user_code"]
        cases: list[tuple[dict[str, str], dict[str, str]]] = [
            ({"user_code": code}, {}),
            ({"user_code": code, "csrf": "x"}, {}),
            ({**foreign, "user_code": code}, {}),
            ({**foreign, "user_code": code}, {"Origin": "https://evil.example"}),
        ]
        for data, headers in cases:
            async with user.post(f"{st.base}/oauth2/device", data=data, headers=headers) as resp:
                assert resp.status == 403
                assert "Allow" not in await resp.text()


async def test_device_authorization_refuses_bad_clients_and_parameters() -> None:
    async with oauth_stack() as st:
        public = await device_client(st.base)
        code_only = await register(st.base)
        secret_client = await device_client(st.base, token_endpoint_auth_method="client_secret_basic")
        cases: list[tuple[dict[str, str], dict[str, str], int, str]] = [
            ({}, {}, 400, "invalid_client"),  # no Basic sent: no challenge, so no 401 (RFC 9110 15.5.2)
            ({"client_id": "nope"}, {}, 400, "invalid_client"),
            ({"client_id": code_only["client_id"]}, {}, 400, "unauthorized_client"),
            ({"client_id": secret_client["client_id"]}, {}, 400, "invalid_client"),
            ({"client_id": secret_client["client_id"], "client_secret": secret_client["client_secret"]}, {}, 400,
             "invalid_client"),  # basic registered: the secret in the form is not its method
            ({"client_id": public["client_id"], "scope": "admin"}, {}, 400, "invalid_scope"),
            ({"client_id": public["client_id"], "resource": "https://evil.example/mcp"}, {}, 400, "invalid_target"),
        ]  # fmt: skip
        for form, headers, status, error in cases:
            got, body = await start_device(st.base, form, headers)
            assert (got, body["error"]) == (status, error), form
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{st.base}/oauth2/device_authorization",
                data=[("client_id", public["client_id"]), ("client_id", public["client_id"])],
            ) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
        basic = base64.b64encode(f"{secret_client['client_id']}:{secret_client['client_secret']}".encode()).decode()
        got, body = await start_device(st.base, {}, {"Authorization": f"Basic {basic}"})
        assert got == 200 and body["device_code"]
        wrong = base64.b64encode(f"{secret_client['client_id']}:wrong".encode()).decode()
        got, body = await start_device(st.base, {}, {"Authorization": f"Basic {wrong}"})
        assert (got, body["error"]) == (401, "invalid_client")


@pytest.mark.parametrize("limit", ["2"])
async def test_device_authorization_is_rate_limited_per_address(limit: str) -> None:
    async with oauth_stack(signin_rate_limit=limit) as st:
        reg = await device_client(st.base)
        statuses = [(await start_device(st.base, {"client_id": reg["client_id"]}))[0] for _ in range(6)]
        assert statuses[:4] == [200] * 4 and statuses[4:] == [429, 429]


async def test_an_expired_device_code_is_just_a_wrong_code() -> None:
    from sidecar.oauth.model import DeviceAuthorization
    from sidecar.oauth.service import OAUTH

    async with oauth_stack() as st, browser() as user:
        reg = await device_client(st.base)
        server = st.runners[0].app[OAUTH]
        expired = DeviceAuthorization(
            device_code_hash="0" * 64,
            user_code="BCDFGHJK",
            client_id=reg["client_id"],
            resource=f"{st.base}/mcp",
            scope="openid",
            expires_at=time.time() - 1,
            interval=5.0,
            status="pending",
        )
        assert await server.store.put_device(expired, 60.0)
        await sign_in(user, st.base)
        resp = await enter_code(user, st.base, "BCDF-GHJK")
        assert resp.status == 400
