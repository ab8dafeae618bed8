"""The authorization server's well-known documents at the URLs clients derive (RFC 8414 3, OIDC Discovery 4,
RFC 9728 3): the issuer is the bare origin, so its documents are at the root; a path-suffixed form names an
issuer that does not exist here and is a plain 404, never the sign-in challenge of the app behind."""

from __future__ import annotations

import aiohttp

from tests.test_oauth_authorize import oauth_stack

NOT_HERE = [
    "/.well-known/oauth-authorization-server/mcp",
    "/.well-known/oauth-authorization-server/",
    "/.well-known/oauth-authorization-server/a/b",
    "/.well-known/openid-configuration/mcp",
    "/.well-known/openid-configuration/",
    "/.well-known/oauth-protected-resource/other",
]


async def test_path_suffixed_well_known_urls_of_an_issuer_that_does_not_exist_are_404() -> None:
    async with oauth_stack() as st, aiohttp.ClientSession() as http:
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            async with http.get(st.base + path) as resp:
                assert resp.status == 200 and (await resp.json())["issuer"] == st.base
        for path in NOT_HERE:
            async with http.get(st.base + path) as resp:
                assert resp.status == 404, path
                assert "WWW-Authenticate" not in resp.headers, path
                assert (await resp.json())["error"] == "not_found", path
