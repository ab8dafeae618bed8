"""``acr_values`` at the authorization server's ``/oauth2/authorize`` (OIDC Core 3.1.2.1): passed on to the grant's
upstream sign-in, and fail-closed (``sidecar/oauth/acr.py``): the client gets a code only when the provider's
``acr`` is one it asked for, else ``unmet_authentication_requirements`` and no grant. Also the ``max_age`` edges
the review asked about (0; no ``auth_time`` in the answer). Real HTTP: the dev provider, a started sidecar, a
scripted browser; one stack for every case."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt

from tests.stack import browser, sign_in
from tests.test_oauth_authorize import authorize_params, consent_page, oauth_stack, pkce, redeem, register
from tests.test_oauth_max_age import _approve

BAD_ACR_VALUES = [
    "",
    "urn:dev:loa:1  urn:dev:loa:2",  # an empty value between two spaces
    " urn:dev:loa:1",
    "urn:dev:loa:1\turn:dev:loa:2",
    'urn:dev:loa:"2"',
    "urn:dev:loa:1'",
    "urn:d\u00e9v:loa:1",
    "x" * 257,
    " ".join(f"v{i}" for i in range(11)),
    "urn:dev:loa:1\nurn:dev:loa:2",
]


def _query(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query)


async def _grant(client: aiohttp.ClientSession, base: str, client_id: str, **extra: str) -> tuple[str, str, str]:
    """Ask, approve, and follow: (the Location that reached the client or "", the PKCE verifier, the state)."""
    verifier, challenge = pkce()
    params = authorize_params(client_id, challenge, **extra)
    page = await consent_page(client, base, params)
    _, location = await _approve(client, base, page)
    return location, verifier, params["state"]


async def _id_token(base: str, client_id: str, location: str, verifier: str) -> dict[str, Any]:
    status, tokens = await redeem(base, client_id, _query(location)["code"][0], verifier)
    assert status == 200, tokens
    claims: dict[str, Any] = jwt.decode(tokens["id_token"], options={"verify_signature": False})
    return claims


async def test_acr_values_reach_the_provider_and_an_unmet_class_gives_no_grant() -> None:
    async with oauth_stack() as st, browser() as client:
        await sign_in(client, st.base)
        reg = await register(st.base)
        cid = reg["client_id"]
        async with client.get(f"{st.base}/.well-known/openid-configuration") as resp:
            assert "acr" in (await resp.json())["claims_supported"]
        # no acr_values: nothing asked, nothing checked, no acr claim (the provider sends none unasked)
        location, verifier, _ = await _grant(client, st.base, cid)
        assert "acr" not in await _id_token(st.base, cid, location, verifier)
        # asked, in order of preference: the provider does the first it can, the client's ID token says which
        for mode, asked, reached in (
            ("honour", "urn:dev:loa:2 urn:dev:loa:1", "urn:dev:loa:2"),
            ("honour", "urn:example:unknown urn:dev:loa:2", "urn:dev:loa:2"),
            ("basic", "urn:dev:loa:2 urn:dev:loa:1", "urn:dev:loa:1"),  # a lower class the client also accepts
        ):
            st.provider.config(acr_mode=mode)
            location, verifier, _ = await _grant(client, st.base, cid, acr_values=asked)
            assert location and "code" in _query(location), (mode, asked, location)
            assert (await _id_token(st.base, cid, location, verifier))["acr"] == reached, (mode, asked)
        # the provider answered with another class, or none: the client is told, and no grant is made
        for mode, asked in (
            ("basic", "urn:dev:loa:2"),
            ("none", "urn:dev:loa:1"),
            ("honour", "urn:example:unknown"),
        ):
            st.provider.config(acr_mode=mode)
            revocations = st.provider.stats()["revocations"]
            location, _, state = await _grant(client, st.base, cid, acr_values=asked)
            query = _query(location)
            assert query.get("error") == ["unmet_authentication_requirements"], (mode, asked, location)
            assert "code" not in query and query["state"] == [state] and query["iss"] == [st.base]
            assert st.provider.stats()["revocations"] > revocations, mode  # the upstream refresh token is dropped
        st.provider.config(acr_mode="honour")


async def test_malformed_or_repeated_acr_values_are_invalid_request() -> None:
    async with oauth_stack() as st, browser() as client:
        await sign_in(client, st.base)
        reg = await register(st.base)
        _, challenge = pkce()
        for bad in BAD_ACR_VALUES:
            params = authorize_params(reg["client_id"], challenge, acr_values=bad)
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 302, (bad, resp.status)
                assert _query(resp.headers["Location"])["error"] == ["invalid_request"], bad
        params = [*authorize_params(reg["client_id"], challenge).items(), ("acr_values", "a"), ("acr_values", "b")]
        async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert _query(resp.headers["Location"])["error"] == ["invalid_request"]
        # max_age=0 asks for a sign-in now (the provider's remembered login does not count); a provider that
        # does not say when (no auth_time, required then by OIDC Core 2) gives the client no code
        st.provider.config(remember_logins=True)
        logins = st.provider.stats()["interactive_logins"]
        location, verifier, _ = await _grant(client, st.base, reg["client_id"], max_age="0")
        assert "code" in _query(location) and st.provider.stats()["interactive_logins"] > logins
        await _id_token(st.base, reg["client_id"], location, verifier)
        st.provider.config(send_auth_time=False)
        location, _, _ = await _grant(client, st.base, reg["client_id"], max_age="600")
        assert not location
