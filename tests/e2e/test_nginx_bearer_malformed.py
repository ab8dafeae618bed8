"""RFC 6750 3.1 through the shipped nginx config (``auth_request``): ``/oauth2/auth`` answers a malformed
``Authorization`` 401 (any other status would be nginx's bare 500) with the ``invalid_request`` challenge, so nginx
hands the request to ``@sidecar_signin``, where the sidecar answers it as the resource itself does: 400
``invalid_request`` with the resource's metadata. A well-formed bad token stays 401 ``invalid_token``."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from tests.e2e.test_nginx import Site, run_site

MALFORMED = [
    ["Bearer"],
    ["Bearer a b"],
    ["Bearer x, Bearer y"],
    ["Bearer sca.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43, "Basic dXNlcjpwYXNz"],
    ["Bearer abc", "Bearer abc"],
]


@pytest.fixture(scope="module")
def oauth_site(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from run_site(redis_server, tmp_path_factory, "--oauth-server", "--oauth-resource=/_demo")


async def test_a_malformed_authorization_through_nginx_is_400_invalid_request_never_a_500(oauth_site: Site) -> None:
    metadata = f'resource_metadata="{oauth_site.base}/.well-known/oauth-protected-resource/_demo"'
    async with aiohttp.ClientSession() as client:
        for lines in MALFORMED:
            headers = [("Authorization", line) for line in lines]
            async with client.get(oauth_site.base + "/_demo/echo", headers=headers, allow_redirects=False) as resp:
                assert resp.status == 400, (lines, resp.status)
                if len(lines) > 1:  # nginx itself refuses a repeated Authorization ("duplicate header line")
                    continue
                # nginx copies the auth subrequest's challenge and then adds @sidecar_signin's: both must say so
                challenges = resp.headers.getall("WWW-Authenticate")
                assert all(metadata in c and 'error="invalid_request"' in c for c in challenges), (lines, challenges)
        async with client.get(oauth_site.base + "/_demo/echo", headers={"Authorization": "Bearer sca.x"}) as resp:
            assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
