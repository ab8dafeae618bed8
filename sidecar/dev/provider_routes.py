"""HTTP endpoints of the development OIDC provider (NOT for production).

Only request parsing and response shaping live here; the grant logic is in
``DevProvider`` so in-process tests and the ``/_control/`` API share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import MultiMapping
from yarl import URL

from .provider_model import FAULT_KINDS, ClientReg, Fault, OAuthError, sha256_hex

if TYPE_CHECKING:
    from .provider import DevProvider

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_AUTHORIZE_PARAMS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "login_hint",
    "max_age",
    "acr_values",
)
SSO_COOKIE = "dev_provider_sso"  # scoped to /authorize: the relying party on the same host never sees it


def _first_values(data: MultiMapping[Any]) -> dict[str, str]:
    """First value of each string parameter (uploaded files are ignored)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str) and key not in out:
            out[key] = value
    return out


def _redirect(location: str) -> web.Response:
    """A plain 302 (returning HTTPFound instances is deprecated in aiohttp)."""
    return web.Response(status=302, headers={"Location": location, **_NO_STORE})


def _page(title: str, body: str, status: int = 200) -> web.Response:
    """A minimal HTML page carrying the not-for-production banner."""
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}"
        ".warn{background:#fee;border:1px solid #c00;padding:.5em}"
        "button{display:block;margin:.5em 0;padding:.6em 1em;width:100%;text-align:left}"
        "</style></head><body>"
        "<p class='warn'>Development identity provider &mdash; not for production</p>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=doc, status=status, content_type="text/html", headers=_NO_STORE)


def _oauth_error(exc: OAuthError) -> web.Response:
    """RFC 6749 section 5.2 JSON error."""
    headers = dict(_NO_STORE)
    if exc.error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="sidecar-dev-provider"'
    body = {"error": exc.error, "error_description": exc.description}
    return web.json_response(body, status=exc.status, headers=headers)


def _client_credentials(
    request: web.Request, form: Mapping[str, str], allowed: tuple[str, ...]
) -> tuple[str | None, str | None]:
    """client_secret_basic (url-decoded per RFC 6749 2.3.1) or client_secret_post, among the ``allowed`` methods."""
    auth = request.headers.get("Authorization")
    if not auth:
        if "client_secret" in form and "client_secret_post" not in allowed:
            raise OAuthError("invalid_client", "client_secret_post is not allowed for this client")
        return form.get("client_id"), form.get("client_secret")
    if "client_secret_basic" not in allowed:
        raise OAuthError("invalid_client", "client_secret_basic is not allowed for this client")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "unsupported client authentication scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("invalid_client", "malformed Basic credentials") from exc
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials")
    client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    if "client_secret" in form:
        raise OAuthError("invalid_request", "more than one client authentication method")
    if form.get("client_id", client_id) != client_id:
        raise OAuthError("invalid_client", "client_id in body differs from Basic credentials")
    return client_id, secret


async def _read_form(request: web.Request) -> dict[str, str]:
    if request.content_type not in _FORM_TYPES:
        raise OAuthError("invalid_request", "expected application/x-www-form-urlencoded")
    return _first_values(await request.post())


class ProviderRoutes:
    """aiohttp handlers bound to one ``DevProvider``."""

    def __init__(self, provider: DevProvider) -> None:
        self.p = provider

    # ------------------------------------------------------------ discovery

    async def discovery(self, request: web.Request) -> web.Response:
        self.p.discovery_calls += 1
        return await self._published("discovery") or web.json_response(self.p.discovery())

    async def jwks(self, request: web.Request) -> web.Response:
        self.p.jwks_calls += 1
        return await self._published("jwks") or web.json_response(self.p.keys.jwks())

    async def _published(self, endpoint: str) -> web.Response | None:
        """The injected misbehaviour of discovery or the JWKS, if any; None: answer normally."""
        fault = self.p.endpoint_faults.get(endpoint)
        if fault is None:
            return None
        kind, delay = fault
        if delay:
            await asyncio.sleep(delay)
        if kind == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if kind == "invalid_json":
            return web.Response(text='{"keys": [', content_type="application/json")
        return None  # slow: answer normally, late

    # ------------------------------------------------------------ authorize

    def _check_authorize(self, params: Mapping[str, str]) -> web.Response | ClientReg:
        """Errors we must not redirect for (bad client / redirect) become a 400 page."""
        client = self.p.clients.get(params.get("client_id", ""))
        if client is None:
            return _page("Sign-in error", "<p>Unknown client_id.</p>", 400)
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri or not client.allows_redirect(redirect_uri):
            return _page("Sign-in error", "<p>redirect_uri is missing or not registered.</p>", 400)
        return client

    def _error_redirect(self, params: Mapping[str, str], error: str, desc: str) -> web.Response:
        query = {"error": error, "error_description": desc}
        if self.p.send_iss:
            query["iss"] = self.p.issuer_id
        if "state" in params:
            query["state"] = params["state"]
        return _redirect(str(URL(params["redirect_uri"]).update_query(query)))

    def _protocol_error(self, params: Mapping[str, str]) -> web.Response | None:
        """Problems reported back to the client by redirect (RFC 6749 4.1.2.1)."""
        if params.get("response_type") != "code":
            return self._error_redirect(params, "unsupported_response_type", "only response_type=code is supported")
        max_age = params.get("max_age")
        if max_age is not None and not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
            return self._error_redirect(params, "invalid_request", "max_age must be a non-negative integer")
        if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
            return self._error_redirect(params, "invalid_request", "PKCE with code_challenge_method=S256 is required")
        if "openid" not in params.get("scope", "").split():
            return self._error_redirect(params, "invalid_scope", "scope must include openid")
        return None

    def _code_redirect(self, params: Mapping[str, str], username: str, auth_time: int | None = None) -> web.Response:
        code = self.p.issue_code(
            params["client_id"],
            params["redirect_uri"],
            params["code_challenge"],
            params.get("nonce"),
            username,
            params.get("scope", "openid"),
            auth_time,
            offline=self.p.offline_allowed(username, params),
            acr=self.p.acr_for(params.get("acr_values")),
        )
        query = {"code": code}
        if self.p.send_iss:
            query["iss"] = self.p.issuer_id
        if "state" in params:
            query["state"] = params["state"]
        return _redirect(str(URL(params["redirect_uri"]).update_query(query)))

    def _authorize_problem(self, params: Mapping[str, str]) -> web.Response | None:
        """Both authorize forms check the client first (400 page), then the protocol (redirect)."""
        checked = self._check_authorize(params)
        if isinstance(checked, web.Response):
            return checked
        return self._protocol_error(params)

    async def authorize_get(self, request: web.Request) -> web.Response:
        params = _first_values(request.query)
        problem = self._authorize_problem(params)
        if problem is not None:
            return problem
        if self.p.auto_login:
            return self._auto_login(request, params, self.p.auto_login)
        if params.get("prompt") == "none":
            return self._error_redirect(params, "login_required", "interactive login needed")
        return self._login_page(params)

    async def authorize_post(self, request: web.Request) -> web.Response:
        params = _first_values(await request.post())
        problem = self._authorize_problem(params)
        if problem is not None:
            return problem
        username = params.get("user", "")
        if username not in self.p.users:
            return _page("Sign-in error", "<p>Unknown user.</p>", 400)
        return self._logged_in(params, username)

    def _auto_login(self, request: web.Request, params: Mapping[str, str], username: str) -> web.Response:
        """``auto_login``: a remembered login that ``max_age`` and ``prompt`` allow answers at once with its
        own time; otherwise this counts as a new interactive login."""
        max_age = int(params["max_age"]) if "max_age" in params else None
        sso = request.cookies.get(SSO_COOKIE)
        remembered = self.p.remembered_login(sso, username, max_age, params.get("prompt", ""))
        if remembered is not None:
            return self._code_redirect(params, username, remembered)
        return self._logged_in(params, username)

    def _logged_in(self, params: Mapping[str, str], username: str) -> web.Response:
        """A new interactive login: the code carries its time, and the browser remembers it when asked to."""
        login_time, sso = self.p.log_in(username)
        response = self._code_redirect(params, username, login_time)
        if sso is not None:
            response.set_cookie(SSO_COOKIE, sso, path="/authorize", httponly=True, samesite="Lax")
        return response

    def _login_page(self, params: Mapping[str, str]) -> web.Response:
        hidden = "".join(
            f"<input type='hidden' name='{html.escape(k, quote=True)}' value='{html.escape(v, quote=True)}'>"
            for k, v in params.items()
            if k in _AUTHORIZE_PARAMS
        )
        buttons = "".join(
            f"<button type='submit' name='user' value='{html.escape(name, quote=True)}'>"
            f"<b>{html.escape(u.name)}</b> &lt;{html.escape(u.email)}&gt; "
            f"&middot; groups: {html.escape(', '.join(u.groups) or '(none)')}</button>"
            for name, u in self.p.users.items()
        )
        client = html.escape(params.get("client_id", ""))
        body = (
            f"<p>Choose who to sign in as for <code>{client}</code>.</p>"
            f"<form method='post' action='/authorize'>{hidden}{buttons}</form>"
        )
        return _page("Sign in", body)

    # ----------------------------------------------------------------- token

    async def token(self, request: web.Request) -> web.Response:
        try:
            form = await _read_form(request)
        except OAuthError as exc:
            return _oauth_error(exc)
        grant_type = form.get("grant_type", "")
        self.p.token_calls[grant_type] = self.p.token_calls.get(grant_type, 0) + 1
        if grant_type == "refresh_token" and form.get("refresh_token"):
            self.p.refresh_tokens_presented.append(sha256_hex(form["refresh_token"]))
        fault = self.p.take_fault(grant_type)
        if fault is not None:
            if fault.kind not in ("timeout", "slow"):
                return await self._fault_response(fault)
            await asyncio.sleep(fault.effective_delay)  # then answer normally
        try:
            client = self.p.authenticate_client(*_client_credentials(request, form, self.p.client_auth_methods))
            if grant_type == "authorization_code":
                body = self.p.exchange_code(client, form)
            elif grant_type == "refresh_token":
                body = await self.p.refresh(client, form)
            else:
                raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r}")
        except OAuthError as exc:
            return _oauth_error(exc)
        return web.json_response(body, headers=_NO_STORE)

    async def _fault_response(self, fault: Fault) -> web.Response:
        if fault.effective_delay:
            await asyncio.sleep(fault.effective_delay)
        if fault.kind == "500":
            body = {"error": "server_error", "error_description": "injected fault"}
            return web.json_response(body, status=500, headers=_NO_STORE)
        if fault.kind == "503":
            body = {"error": "temporarily_unavailable", "error_description": "injected fault"}
            return web.json_response(body, status=503, headers={**_NO_STORE, "Retry-After": "1"})
        if fault.kind == "invalid_grant":
            return _oauth_error(OAuthError("invalid_grant", "injected fault"))
        if fault.kind == "raw":
            return web.Response(
                status=fault.status,
                text=fault.body,
                content_type=fault.content_type,
                headers={**_NO_STORE, **fault.headers},
            )
        return web.Response(  # invalid_json
            text='{"access_token": "trunc', content_type="application/json", headers=_NO_STORE
        )

    # ----------------------------------------------------- userinfo, revoke

    async def userinfo(self, request: web.Request) -> web.Response:
        self.p.userinfo_calls += 1
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise OAuthError("invalid_token", "missing bearer token")
            user = self.p.check_access_token(token.strip())
        except OAuthError as exc:
            desc = exc.description.replace('"', "'").replace("\\", "/")
            challenge = f'Bearer error="invalid_token", error_description="{desc}"'
            return web.json_response(
                {"error": "invalid_token", "error_description": exc.description},
                status=401,
                headers={**_NO_STORE, "WWW-Authenticate": challenge},
            )
        return web.json_response(user.claims(), headers=_NO_STORE)

    async def revoke(self, request: web.Request) -> web.Response:
        self.p.revoke_calls += 1  # every POST, advertised or not: a client must not guess the endpoint
        if not self.p.revocation_endpoint:
            return web.json_response({"error": "not_found"}, status=404)
        broken = await self._published("revoke")
        if broken is not None:
            return broken
        try:
            form = await _read_form(request)
            client = self.p.authenticate_client(*_client_credentials(request, form, self.p.client_auth_methods))
            token = form.get("token")
            if not token:
                raise OAuthError("invalid_request", "missing token")
            self.p.revoke(client, token)
        except OAuthError as exc:
            return _oauth_error(exc)
        return web.Response(status=200, headers=_NO_STORE)

    async def logout(self, request: web.Request) -> web.Response:
        """RP-initiated logout; lenient about the hint since keys may have rotated."""
        params = _first_values(request.query)
        if request.method == "POST":
            params.update(_first_values(await request.post()))
        self.p.logout_calls += 1
        target = params.get("post_logout_redirect_uri")
        if target:
            url = URL(target)
            if "state" in params:
                url = url.update_query({"state": params["state"]})
            return _redirect(str(url))
        return _page("Signed out", "<p>You have been signed out of the development provider.</p>")

    # --------------------------------------------------------------- control

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    async def control(self, request: web.Request) -> web.Response:
        """One handler for every ``/_control/`` action; ValueError becomes a 400."""
        action = request.match_info["action"]
        try:
            data = await self._json_body(request)
            result = self._control_action(action, request.method, data)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if result is None:
            return web.json_response({"error": f"unknown control action {action!r}"}, status=404)
        return web.json_response(result, headers=_NO_STORE)

    def _control_action(self, action: str, method: str, data: dict[str, Any]) -> dict[str, Any] | None:
        p = self.p
        if action == "stats":
            return p.stats()
        if action == "config":
            return p.config(data) if method == "POST" else p.settings()
        if method != "POST":
            raise ValueError(f"{action} needs POST")
        if action == "fault":
            kind = str(data["kind"])
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r}")
            fault = p.inject_fault(
                kind,
                int(data.get("count", 1)),
                str(data.get("grant", "refresh_token")),
                float(data.get("delay", 0.0)),
                status=int(data.get("status", 400)),
                body=str(data.get("body", "")),
                content_type=str(data.get("content_type", "application/json")),
                headers={str(k): str(v) for k, v in dict(data.get("headers") or {}).items()},
            )
            return {"ok": True, "fault": fault.to_dict()}
        if action == "endpoint_fault":
            p.break_endpoint(str(data["endpoint"]), str(data["kind"]), float(data.get("delay", 0.0)))
            return {"ok": True}
        if action == "token_overrides":
            fields = data.get("fields", {})
            if not isinstance(fields, dict):
                raise ValueError("fields must be an object")
            p.override_token_fields(fields)
            return {"ok": True}
        if action == "clear_faults":
            p.clear_faults()
            return {"ok": True}
        if action == "rotate_keys":
            kid = p.rotate_keys(bool(data.get("keep_old", True)))
            return {"ok": True, "kid": kid, "kids": [k.kid for k in p.keys.keys]}
        if action == "reset_counters":
            p.reset_counters()
            return {"ok": True}
        if action == "backdate_logins":
            p.backdate_logins(int(data["seconds"]))
            return {"ok": True}
        if action == "forget_refresh_tokens":
            user = data.get("user")
            return {"ok": True, "forgotten": p.forget_refresh_tokens(None if user is None else str(user))}
        if action == "revoke_user":
            return {"ok": True, "revoked": p.revoke_user(str(data["sub"]))}
        if action == "set_groups":
            groups = data["groups"]
            if not isinstance(groups, list):
                raise ValueError("groups must be a list")
            p.set_groups(str(data["user"]), groups)
            return {"ok": True}
        return None


def build_app(provider: DevProvider) -> web.Application:
    """The aiohttp application for ``provider``."""
    r = ProviderRoutes(provider)
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", r.discovery)
    app.router.add_get("/jwks", r.jwks)
    app.router.add_get("/authorize", r.authorize_get)
    app.router.add_post("/authorize", r.authorize_post)
    app.router.add_post("/token", r.token)
    app.router.add_route("GET", "/userinfo", r.userinfo)
    app.router.add_route("POST", "/userinfo", r.userinfo)
    app.router.add_post("/revoke", r.revoke)
    app.router.add_route("GET", "/logout", r.logout)
    app.router.add_route("POST", "/logout", r.logout)
    app.router.add_route("*", "/_control/{action}", r.control)
    return app
