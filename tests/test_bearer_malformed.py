"""RFC 6750 section 3.1 against a started sidecar: a request whose ``Authorization`` is malformed (two headers, a
Bearer header whose credentials are not one b64token) is ``400 invalid_request``; one with no credentials, or
another scheme, gets the plain challenge (401, no error code); a well-formed token that is not valid is
``401 invalid_token``. At ``/oauth2/auth`` (an nginx ``auth_request`` target, where any status but 2xx/401/403
becomes a 500 for the client) the malformed cases are 401 with the same ``invalid_request`` challenge. One
stack: ``--oauth-server`` with ``/mcp`` as its resource and ``--skip-jwt-bearer-tokens`` for the other paths."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from tests.stack import stack
from tests.test_oauth_tokens import new_grant, redeem

# (Authorization header lines, what is wrong with them)
MALFORMED: list[tuple[list[str], str]] = [
    (["Bearer"], "no token"),
    (["Bearer "], "no token, one space"),
    (["bearer    "], "no token, spaces"),
    (["Bearer a b"], "two words"),
    (["Bearer a,b"], "a comma"),
    (["Bearer x, Bearer y"], "two credentials merged into one header by a proxy"),
    (["Bearer ab=c"], "padding inside"),
    (["Bearer a;b"], "a semicolon"),
    (['Bearer a"b'], "a quote"),
    (["Bearer {GOOD}", "Basic dXNlcjpwYXNz"], "two headers, the other Basic"),
    (["Basic dXNlcjpwYXNz", "Bearer {GOOD}"], "two headers, Bearer second"),
    (["Bearer {GOOD}", "Bearer {GOOD}"], "the same Bearer header twice"),
    (["Bearer {GOOD}", ""], "a second, empty header"),
]


def _claims(issuer: str) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": issuer, "sub": "cli-1", "aud": "sidecar-dev", "iat": now, "exp": now + 300, "email": "c@x.org"}


async def _get(url: str, lines: list[str], **extra: str) -> aiohttp.ClientResponse:
    headers = [("Authorization", v) for v in lines] + list(extra.items())
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp


async def test_malformed_authorization_is_400_invalid_request_and_401_at_the_auth_subrequest() -> None:
    async with stack(
        None, oauth_server="true", oauth_resource="/mcp", skip_jwt_bearer_tokens="true", reverse_proxy="true"
    ) as st:
        issued = await new_grant(st, "/mcp")
        status, tokens, _ = await redeem(st.base, issued)
        assert status == 200
        sca, jwt_good = tokens["access_token"], st.provider.keys.sign(_claims(st.issuer))
        metadata = f'resource_metadata="{st.base}/.well-known/oauth-protected-resource/mcp"'
        # the well-formed ones pass: the sidecar's token on its resource, a JWT elsewhere
        assert (await _get(f"{st.base}/mcp/x", [f"Bearer {sca}"])).status == 200
        assert (await _get(f"{st.base}/api/x", [f"Bearer {jwt_good}"])).status == 200
        for good, path in ((sca, "/mcp/x"), (jwt_good, "/api/x")):
            for lines, what in MALFORMED:
                sent = [line.replace("{GOOD}", good) for line in lines]
                resp = await _get(st.base + path, sent)
                assert resp.status == 400, (path, what, resp.status)
                challenge = resp.headers["WWW-Authenticate"]
                assert challenge.startswith("Bearer ") and 'error="invalid_request"' in challenge, (path, what)
                assert (metadata in challenge) == (path == "/mcp/x"), (path, what, challenge)
                assert resp.headers["Cache-Control"] == "no-store"
                assert good not in challenge
                # the same request asked about by a front: 401, never 400 (nginx would make it a 500)
                front = await _get(f"{st.base}/oauth2/auth", sent, **{"X-Original-URI": path})
                assert front.status == 401, (path, what, front.status)
                assert front.headers["WWW-Authenticate"] == challenge, (path, what)  # invalid_request: not refreshed
                assert "X-Auth-Request-Email" not in front.headers
        # a well-formed token that is not valid: 401 invalid_token, here and at the front
        for path, token in (("/mcp/x", "sca.garbage"), ("/api/x", "not-a-jwt"), ("/api/x", jwt_good[:-4] + "AAAA")):
            for url, extra in ((st.base + path, {}), (f"{st.base}/oauth2/auth", {"X-Original-URI": path})):
                resp = await _get(url, [f"Bearer {token}"], **extra)
                assert resp.status == 401, (url, path, token)
                assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"], (url, path)
        # no credentials, or another scheme: the plain challenge, with no error code (RFC 6750 3.1)
        for lines in ([], ["Basic dXNlcjpwYXNz"], ["Digest username=x"], ["Bearerx abc"]):
            resp = await _get(f"{st.base}/mcp/x", lines)
            assert resp.status == 401, lines
            challenge = resp.headers["WWW-Authenticate"]
            assert challenge.startswith("Bearer ") and metadata in challenge and "error=" not in challenge, lines
            front = await _get(f"{st.base}/oauth2/auth", lines, **{"X-Original-URI": "/mcp/x"})
            assert front.status == 401 and "error=" not in front.headers["WWW-Authenticate"], lines
            resp = await _get(f"{st.base}/api/x", lines)  # not a resource: the cookie decides (sign in)
            assert resp.status == 401 and "error=" not in resp.headers.get("WWW-Authenticate", ""), lines
