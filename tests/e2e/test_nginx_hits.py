"""Real nginx (the shipped sidecar.conf) with its auth subrequests sent to the sidecar's main listener, where
decision-cache hits are answered before aiohttp builds a request (``sidecar/hits.py``): nginx's own keep-alive
upstream connections, its own X-Forwarded-* and X-Original-URI, two sessions' page loads interleaved on them."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import aiohttp

from sidecar.store import MemoryStore
from tests.e2e.procs import free_port, render_nginx_conf, start_nginx
from tests.stack import stack
from tests.test_decisions import TOKENS, _signed_in, lookups
from tests.test_hits import counting


async def test_nginx_page_loads_get_their_own_sessions_identity_from_hits_on_the_main_listener() -> None:
    settings = {"reverse_proxy": "true", "trusted_proxy": "127.0.0.1/32"}
    async with stack(MemoryStore(), **settings, **TOKENS) as st:
        cookies = [await _signed_in(st), await _signed_in(st)]
        sidecar = st.base.removeprefix("http://")
        port = free_port()
        conf = render_nginx_conf(port, sidecar, st.upstream_url.removeprefix("http://"), auth=sidecar)
        logs = Path(tempfile.mkdtemp(prefix="nginx-hits-"))
        nginx = await asyncio.to_thread(start_nginx, conf, port, log_dir=logs)
        try:
            base = f"http://127.0.0.1:{port}"
            made = counting(st.runners[0].server)
            before = lookups()
            async with aiohttp.ClientSession() as http:

                async def page(n: int, method: str = "GET") -> tuple[int, str | None]:
                    headers = {"Cookie": f"_sidecar={cookies[n % 2]}"}
                    async with http.request(method, f"{base}/_demo/echo", headers=headers) as r:
                        if method == "HEAD":
                            return r.status, None
                        body = await r.read()
                        if r.status != 200:
                            return r.status, body.decode(errors="replace")
                        data = json.loads(body)
                        return r.status, data["headers"].get("X-Forwarded-Access-Token")

                warm = [await page(n) for n in range(4)]  # each session's key seen twice: kept
                tokens = {n % 2: token for n, (_, token) in enumerate(warm)}
                assert tokens[0] and tokens[1] and tokens[0] != tokens[1]
                got = await asyncio.gather(*(page(n, "HEAD" if n % 5 == 4 else "GET") for n in range(300)))
                for n, (status, token) in enumerate(got):
                    assert status == 200, n
                    assert token in (None if n % 5 == 4 else tokens[n % 2],), n
                hits = lookups()["hit"] - before["hit"]
                auth_made = len(made)
                assert hits >= 250 and auth_made < 100, (hits, auth_made)  # answered by the hit path

                async with aiohttp.ClientSession(cookies={"_sidecar": cookies[0]}) as client:
                    async with client.get(st.base + "/oauth2/sign_out", allow_redirects=False) as resp:
                        assert resp.status == 302
                after = await asyncio.gather(*(page(n) for n in range(20)))
                assert [status for status, _ in after[0::2]] == [401] * 10  # signed out: nginx's 401 for an API call
                assert [status for status, _ in after[1::2]] == [200] * 10
        finally:
            nginx.stop()
