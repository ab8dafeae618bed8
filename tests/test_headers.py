"""Identity headers: exact values, hostile claims, huge group lists, every spelling stripped."""

from __future__ import annotations

from sidecar.config import build_config
from sidecar.headers import (
    MAX_GROUPS_HEADER,
    MAX_VALUE,
    auth_response_headers,
    is_protected,
    join_groups,
    upstream_identity_headers,
)
from sidecar.models import Identity, Session, TokenSet
from sidecar.policy import identity_from_claims, is_allowed
from sidecar.store import MemoryStore
from tests.stack import browser, free_port, sidecar_settings, sign_in, stack


def _config(**overrides: str):  # type: ignore[no-untyped-def]
    return build_config(sidecar_settings("http://127.0.0.1:1", free_port(), **overrides))


def test_every_spelling_of_an_identity_header_is_protected() -> None:
    for name in (
        "X-Auth-Request-User",
        "x-auth-request-user",
        "X_Auth_Request_User",
        "X-AUTH-REQUEST-ANYTHING",
        "X-Forwarded-User",
        "x_forwarded_email",
        "X-Forwarded-Groups",
        "Authorization",
        "X-Forwarded-Preferred-Username",
        "X-Forwarded-Access-Token",
    ):
        assert is_protected(name), name
    for name in ("X-Forwarded-For", "X-Forwarded-Proto", "Content-Type", "X-Request-Id"):
        assert not is_protected(name), name
    assert not is_protected("Authorization", authorization=False)  # the client's own, when the sidecar sets none


def test_control_characters_never_reach_a_header_value() -> None:
    claims = {
        "sub": "s1",
        "email": "a@example.com\r\nSet-Cookie: x=1",
        "preferred_username": "bob\x00\x7f",
        "groups": ["ok", "evil\r\nX-Injected: 1", 42],
    }
    identity = identity_from_claims(claims, _config())
    for value in (identity.sub, identity.email, identity.preferred_username, *identity.groups):
        assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    # A value that is not clean is left out whole, never trimmed into something else.
    assert identity.groups == ("ok",) and identity.email == "" and identity.preferred_username == ""


def test_huge_group_lists_are_capped_at_a_group_boundary() -> None:
    groups = [f"group-{i:05d}" for i in range(5000)]
    joined = join_groups(groups)
    assert len(joined) <= MAX_GROUPS_HEADER
    assert all(part.startswith("group-") and len(part) == 11 for part in joined.split(","))
    assert join_groups(["a,b", "c"]) == "c"  # a comma inside a group would forge a second group


def test_email_domain_and_group_rules() -> None:
    ident = identity_from_claims({"sub": "s", "email": "Ann@Example.COM", "groups": ["dev"]}, _config())
    assert is_allowed(ident, _config())
    assert is_allowed(ident, _config(email_domain="example.com"))
    assert not is_allowed(ident, _config(email_domain="example.org"))
    assert is_allowed(ident, _config(allowed_group="dev,ops"))
    assert not is_allowed(ident, _config(allowed_group="ops"))
    unverified = identity_from_claims({"sub": "s", "email": "a@example.com", "email_verified": False}, _config())
    assert unverified.email == "" and not is_allowed(unverified, _config(email_domain="example.com"))


async def test_huge_and_hostile_groups_from_the_provider_give_a_sane_202() -> None:
    settings = {"pass_authorization_header": "true", "upstream": "", "reverse_proxy": "true"}
    async with stack(MemoryStore(), **settings) as st, browser() as client:
        st.provider.set_groups("alice", [f"team-{i}" for i in range(3000)] + ["bad\r\nX-Evil: 1"])
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202
            assert len(resp.headers["X-Auth-Request-Groups"]) <= MAX_GROUPS_HEADER
            assert "X-Evil" not in resp.headers
            assert resp.headers["Authorization"].startswith("Bearer ey")


async def test_forbidden_user_gets_403_at_sign_in_and_at_auth() -> None:
    async with stack(MemoryStore(), email_domain="example.org") as st, browser() as client:
        resp = await sign_in(client, st.base)  # alice is @example.com
        assert resp.status == 403
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401  # no session was made for her
    async with stack(MemoryStore(), allowed_group="admins") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202
        st.provider.set_groups("alice", ["staff"])


async def test_sign_out_goes_through_the_providers_end_session_endpoint() -> None:
    async with stack(MemoryStore(), oidc_logout_id_token_hint="true") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/sign_out", params={"rd": "/bye"}, allow_redirects=False) as resp:
            location = resp.headers["Location"]
            assert "Max-Age=0" in resp.headers["Set-Cookie"] or "expires" in resp.headers["Set-Cookie"].lower()
        assert location.startswith(st.issuer + "/logout?")
        assert "post_logout_redirect_uri=http%3A%2F%2F127.0.0.1" in location and "%2Fbye" in location
        assert "id_token_hint=" in location


async def test_without_the_id_token_kept_sign_out_names_the_client_instead() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
            location = resp.headers["Location"]
        assert location.startswith(st.issuer + "/logout?") and "client_id=sidecar-dev" in location
        assert "id_token_hint" not in location


_ODD_STRINGS = [
    "\ud800",
    "a\udfffb",
    "x\r\ny",
    "\x00",
    "\x85next-line",
    "\x7f\x9f",
    "é ☃ 𝄞",
    "a" * 1_000_000,
    "",
    " ",
    "a,b",
]
_ODD_VALUES: list[object] = [*_ODD_STRINGS, None, 42, 1.5, True, {"a": 1}, ["x"], b"bytes"]


def _sendable(value: str) -> bool:
    """What aiohttp can write in a header: encodable, no line breaks or other control characters."""
    value.encode("utf-8")
    return not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in value)


def test_group_lists_of_odd_values_never_break_the_header() -> None:
    for size in (1, 3, len(_ODD_VALUES)):
        for start in range(len(_ODD_VALUES)):
            groups = (_ODD_VALUES[start:] + _ODD_VALUES[:start])[:size]
            joined = join_groups(groups)  # type: ignore[arg-type]
            assert _sendable(joined) and len(joined) <= MAX_GROUPS_HEADER, groups
    assert join_groups(["ok", 42, None, "x\r\ny", "\ud800z"]) == "ok,xy,z"  # type: ignore[list-item]


def test_identity_headers_from_odd_claim_strings_are_sendable() -> None:
    config = _config(pass_user_headers="true", pass_access_token="true", pass_authorization_header="true")
    for odd in _ODD_STRINGS:
        identity = Identity(sub=odd or "s", user=odd, email=odd, groups=(odd, "g"), preferred_username=odd)
        session = Session(identity=identity, tokens=TokenSet(access_token="tok" + odd[:100]))
        for headers in (auth_response_headers(session, config), upstream_identity_headers(session, config)):
            for name, value in headers.items():
                assert _sendable(value) and len(value) <= MAX_VALUE + 100, (name, odd[:20])
        if len(odd) > MAX_VALUE:  # cut, it could name someone else: left out instead
            assert "X-Auth-Request-User" not in auth_response_headers(session, config)
