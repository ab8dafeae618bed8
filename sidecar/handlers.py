"""The sidecar's own endpoints: ``/oauth2/*``, ``/ping``, ``/ready`` and ``/metrics``."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import logging
import secrets
import time
from urllib.parse import quote, urlsplit

from aiohttp import web
from multidict import CIMultiDict

from . import csrf, devices, kit, logs, metrics, pages
from .config import Config
from .context import (
    AUTHED,
    BY_SIDECAR_TOKEN,
    DECISION_KEY,
    Services,
    forwarded_client_ip,
    original_of,
    services,
    trusted_peer,
    view_of,
)
from .cookies import (
    CLOCK_LEEWAY,
    MAX_COOKIE_CHARS,
    SessionRef,
    SignInAttempt,
    state_cookie_suffix,
    without_sidecar_cookies,
)
from .decisions import Decision, Key, request_key
from .errors import (
    BadRequest,
    InvalidCookie,
    InvalidState,
    ProviderError,
    SessionGone,
    StoreUnavailable,
    TokenValidationError,
)
from .fronts import FRONTS, Original, refuse_aliases
from .guard import (
    BEARER_REF,
    TOKEN_HEADERS,
    absolute,
    authenticate,
    authorize,
    callback_url,
    clear_cookie,
    clear_session_cookie,
    read_cookie,
    set_cookie,
    tokens_allowed,
)
from .headers import auth_response_headers_for
from .location_rules import location_rules
from .middleware import guarded
from .models import Identity, Session
from .oidc import Pkce, logout_token_replay_ttl
from .policy import identity_from_claims, why_denied
from .proxy import normalise_path
from .ratelimit import retry_after
from .stepup import callback_problem, is_stale, parse_max_age, required_max_age, start_url
from .stepup import unauthorized as step_up_unauthorized
from .urls import safe_redirect

log = logging.getLogger("sidecar.handlers")

STATE_TTL = 600.0  # a sign-in attempt must finish within ten minutes
MAX_ATTEMPT_COOKIES = 5  # live sign-in attempts (tabs) per browser; older ones are cleared at /oauth2/start
PARALLEL_TABS_WINDOW = 120.0  # at a successful callback, attempts younger than this may be other tabs: kept
_CALLBACK_SINGLE = ("state", "code", "iss", "error")  # RFC 6749 3.1: a parameter may not be repeated
_TRUE = ("1", "true", "yes", "on")


_page = pages.page


def _rd(request: web.Request) -> str:
    """Where to return: ``rd``, else ``X-Auth-Request-Redirect`` (set by nginx's sign-in location,
    which cannot URL-escape the original URI itself), checked by ``safe_redirect``."""
    rd = request.query.get("rd") or request.headers.get("X-Auth-Request-Redirect")
    view = view_of(request)
    return safe_redirect(rd, view.scheme, view.host, services(request).config.redirect_hosts)


def _attempt_prefix(config: Config) -> str:
    return f"{config.cookie_name}_csrf_"


def _state_cookie_name(config: Config, state: str) -> str:
    return _attempt_prefix(config) + state_cookie_suffix(state)


def _rate_limited(request: web.Request, svc: Services) -> web.Response | None:
    """Anonymous sign-in endpoints are limited per client (429 + Retry-After), in process memory."""
    per_minute = float(svc.config.signin_rate_limit)
    wait = svc.signin_limiter.take(view_of(request).client_ip, per_minute, 2 * per_minute, time.monotonic())
    if not wait:
        return None
    text = "429 Too Many Requests: too many sign-in attempts, try again shortly\n"
    return pages.too_many(request, text, retry_after(wait))


def _attempt_cookie_value(svc: Services, attempt: SignInAttempt) -> str:
    """The sealed attempt; a ``rd`` too long for a cookie falls back to ``/`` rather than losing the cookie."""
    value = svc.codec.dump_attempt(attempt)
    if len(value) > MAX_COOKIE_CHARS - 200:
        value = svc.codec.dump_attempt(dataclasses.replace(attempt, rd="/"))
    return value


def _clear_old_attempts(
    request: web.Request, response: web.Response, svc: Services, keep: int, max_age: float = STATE_TTL
) -> None:
    """Keep the ``keep`` newest attempt cookies younger than ``max_age`` (parallel tabs), clear every other one.

    Without this each abandoned sign-in leaves a cookie behind until the browser's Cookie header
    outgrows every server's limit."""
    config = svc.config
    now, prefix = time.time(), _attempt_prefix(config)
    live: list[tuple[float, str]] = []
    for name, value in request.cookies.items():
        if not name.startswith(prefix):
            continue
        signed_at = svc.codec.attempt_signed_at(value)
        if signed_at is not None and -CLOCK_LEEWAY <= now - signed_at <= max_age:
            live.append((signed_at, name))
        else:
            clear_cookie(response, config, name)
    live.sort(reverse=True)
    for _, name in live[keep:]:
        clear_cookie(response, config, name)


async def start(request: web.Request, svc: Services) -> web.Response:
    """Begin sign-in: seal (verifier, nonce, rd) into this attempt's own cookie, send the browser to the provider.

    Nothing is stored server-side, so anonymous requests here cost the store nothing."""
    limited = _rate_limited(request, svc)
    if limited is not None:
        return limited
    rd = _rd(request)
    return await begin_sign_in(request, svc, rd, max_age=_start_max_age(request, svc.config, rd))


async def begin_sign_in(
    request: web.Request,
    svc: Services,
    rd: str,
    *,
    max_age: int | None = None,
    purpose: str = "",
    scope: str | None = None,
) -> web.Response:
    """The redirect to the provider, with this attempt sealed in its own cookie. ``purpose`` ("kind:id")
    hands the callback's tokens to ``svc.sign_in_finishers[kind]`` instead of making a browser session;
    ``scope`` replaces ``--scope`` for this sign-in (``sidecar.oauth`` adds ``offline_access``)."""
    state, nonce, pkce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), Pkce.new()
    redirect_uri = callback_url(request, svc.config)  # sealed in the attempt: the code exchange sends the same
    attempt = SignInAttempt(state, pkce.verifier, nonce, rd, redirect_uri, max_age=max_age, purpose=purpose)
    url = await svc.oidc.authorize_url(state, nonce, pkce, redirect_uri=redirect_uri, max_age=max_age, scope=scope)
    response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
    _clear_old_attempts(request, response, svc, keep=MAX_ATTEMPT_COOKIES - 1)
    name = _state_cookie_name(svc.config, state)
    set_cookie(response, svc.config, name, _attempt_cookie_value(svc, attempt), STATE_TTL)
    return response


def _start_max_age(request: web.Request, config: Config, rd: str) -> int | None:
    """The ``max_age`` this sign-in asks of the provider: the ``max_age`` parameter (nginx's step-up
    locations send it), and the strictest ``--fresh-auth-route`` matching the page to return to, so a
    plain ``/oauth2/start?rd=/admin/`` (nginx's generic sign-in location) cannot loop on a stale session."""
    values = request.query.getall("max_age", [])
    asked = parse_max_age(values[0]) if len(values) == 1 else None
    if values and asked is None:
        raise BadRequest("max_age must be given once, as a whole number of seconds")
    try:
        path = normalise_path(urlsplit(rd).path or "/")
    except (BadRequest, ValueError):
        path = None  # an rd no route rule can read: only an explicit max_age applies
    by_route = required_max_age(config.fresh_routes, "GET", path) if path is not None else None
    ages = [age for age in (asked, by_route) if age is not None]
    return min(ages) if ages else None


def _callback_params(request: web.Request) -> tuple[str, str, str | None]:
    """(state, code, iss): each at most once and non-empty when present, else 400 before any provider call."""
    query = request.query
    for name in _CALLBACK_SINGLE:
        if len(query.getall(name, [])) > 1:
            raise InvalidState(f"callback repeats the {name} parameter")
    state, code, issuer = query.get("state", ""), query.get("code", ""), query.get("iss")
    if not state or not code or len(state) > 256 or len(code) > 4096:
        raise InvalidState("callback without state or code")
    if issuer is not None and (not issuer or len(issuer) > 2048):
        raise InvalidState("callback iss is empty or too long")
    return state, code, issuer


async def _claim(svc: Services, state: str, signed_for: float) -> None:
    """Mark the state used (SET NX) for as long as its cookie could still be presented: single use."""
    marker = hashlib.sha256(b"state:" + state.encode()).hexdigest()[:32]
    if not await svc.sessions.store.claim_state(marker, max(1.0, signed_for)):
        raise InvalidState("sign-in state already used")


async def callback(request: web.Request, svc: Services) -> web.Response:
    """Finish sign-in. Parameters, the attempt cookie and the single-use marker are checked before any
    provider call; only a request carrying a valid attempt cookie writes to the store."""
    limited = _rate_limited(request, svc)
    if limited is not None:
        return limited
    config = svc.config
    if "error" in request.query:
        said = request.query.get("error", "")[:100]
        logs.event("sign_in_refused", {"reason": "provider_error", "client_ip": view_of(request).client_ip})
        return pages.refused_sign_in(request, said)
    state, code, issuer = _callback_params(request)
    if issuer is not None and issuer != (await svc.oidc.metadata()).issuer:
        raise InvalidState("callback iss does not name our provider (RFC 9207)")
    cookie_name = _state_cookie_name(config, state)
    attempt = svc.codec.load_attempt(request.cookies.get(cookie_name), state, time.time(), STATE_TTL)
    await _claim(svc, state, STATE_TTL + CLOCK_LEEWAY)
    tokens = await svc.oidc.exchange_code(code, attempt.verifier, attempt.redirect_uri)
    if not tokens.id_token:
        raise TokenValidationError("token response has no id_token")
    claims = await svc.oidc.validate_id_token(tokens.id_token, nonce=attempt.nonce)
    stale = None if attempt.max_age is None else callback_problem(claims, attempt.max_age, time.time())
    if stale is not None:
        return _step_up_refused(request, config, cookie_name, stale)
    identity = identity_from_claims(claims, config)
    denied = why_denied(identity, config)
    if denied is not None:
        metrics.DECISIONS.add("403")
        _log_denial(request, identity, denied, "/oauth2/callback")
        response = pages.forbidden(request, identity.email or identity.user)
        clear_cookie(response, config, cookie_name)
        return response
    if attempt.purpose:
        finisher = svc.sign_in_finishers.get(attempt.purpose.partition(":")[0])
        if finisher is None:
            raise InvalidState("sign-in for a purpose this sidecar does not serve")
        response = await finisher(request, attempt, identity, tokens, claims)
        clear_cookie(response, config, cookie_name)
        return response
    await _end_previous_session(request)
    ref, _ = await svc.sessions.create(identity, tokens, claims)
    try:
        await devices.remember_device(request, svc, ref, identity.sub)
    except StoreUnavailable:  # the session is made; without its card the account page only leaves it out
        log.warning("device card not stored", extra={"fields": {"error": "StoreUnavailable"}})
    logs.event("sign_in", {**logs.who(identity), "client_ip": view_of(request).client_ip})
    response = web.Response(status=302, headers={"Location": attempt.rd, "Cache-Control": "no-store"})
    set_cookie(response, config, config.cookie_name, svc.codec.dump_session(ref), config.cookie_expire)
    # Signed in: abandoned attempts go; only tabs started moments ago, still racing this one, keep theirs.
    _clear_old_attempts(request, response, svc, keep=MAX_ATTEMPT_COOKIES, max_age=PARALLEL_TABS_WINDOW)
    clear_cookie(response, config, cookie_name)
    return response


def _step_up_refused(request: web.Request, config: Config, cookie_name: str, problem: str) -> web.Response:
    """A sign-in that asked for ``max_age`` came back without proof of a recent one. No new session (it would
    be as stale as the old), the old one untouched, and no sign-in link: following it would loop."""
    log.warning("fresh sign-in not confirmed by the provider", extra={"fields": {"problem": problem}})
    response = pages.error(
        request,
        403,
        "Fresh sign-in not confirmed",
        f"This page needs a recent sign-in, but {problem}. Ask the administrator to check that the identity "
        "provider honours max_age.",
        (),
    )
    clear_cookie(response, config, cookie_name)
    return response


async def _end_previous_session(request: web.Request) -> None:
    """A sign-in replaces whatever session the browser had; its old record goes."""
    svc = services(request)
    old = request.cookies.get(svc.config.cookie_name)
    if not old:
        return
    try:
        ref = svc.codec.load_session(old, time.time())
        await svc.sessions.end(ref, None, reason="replaced")
    except (InvalidCookie, StoreUnavailable):
        pass


async def sign_in(request: web.Request, svc: Services) -> web.Response:
    """The sign-in page, from the built-in or the operator's ``sign_in.html`` (values escaped there)."""
    rd = _rd(request)
    href = f"{svc.config.proxy_prefix}/start?rd={quote(rd, safe='')}"
    text = svc.config.pages.render("sign_in", title="Sign in", sign_in_url=href, redirect=rd)
    return web.Response(text=text, content_type="text/html", headers=_built_in_headers(svc.config, "sign_in"))


def _built_in_headers(config: Config, name: str) -> dict[str, str] | None:
    """The kit's strict headers (CSP by the stylesheet's hash) on the kit's pages; an operator's own template
    may carry its own styles, so it keeps the headers it had."""
    return kit.HEADERS if config.pages.built_in(name) else None


def _same_origin(request: web.Request) -> bool:
    """A state-changing POST must come from our own pages.

    A real origin in ``Origin`` decides. ``Origin: null`` is what Chromium sends for a same-origin form
    posted from a page whose referrer policy hides the origin, and also what a sandboxed or opaque page
    sends, so then ``Sec-Fetch-Site`` decides (``same-origin`` or ``none``, a typed-in navigation); a
    ``null`` without it is refused. Clients that send neither header (curl, scripts) are not browsers
    riding on a cookie from another site. A browser sends each header once: two of either, or an
    ``Origin`` that is not a bare origin, is refused, never read by its first value."""
    origins = request.headers.getall("Origin", [])
    sites = request.headers.getall("Sec-Fetch-Site", [])
    if len(origins) > 1 or len(sites) > 1:
        return False
    origin = origins[0].strip() if origins else None
    site = sites[0].strip().lower() if sites else None
    if origin is not None and origin.lower() != "null":
        view = view_of(request)
        ours = _origin_tuple(f"{view.scheme}://{view.host}")
        # a browser that says cross-site is believed even when Origin looks right (it cannot be forged by a page)
        return ours is not None and _origin_tuple(origin) == ours and site in (None, "same-origin")
    if origin is not None:  # "null"
        return site in ("same-origin", "none")
    return site is None or site in ("same-origin", "none")


def _origin_tuple(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None for ``null`` or anything that is not a bare
    ``scheme://host[:port]`` (user info, a query or fragment, a path other than ``/``)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in origin or "#" in origin:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


async def _wants_everywhere(request: web.Request) -> bool:
    value = request.query.get("everywhere", "")
    if not value and request.method == "POST":
        value = str((await request.post()).get("everywhere", ""))
    return value.lower() in _TRUE


def _confirm_everywhere_page(request: web.Request) -> web.Response:
    """A GET never signs a user out everywhere (a link or image on another site could): it asks for a POST,
    with a token bound to this browser's session (``csrf.py``)."""
    svc = services(request)
    prefix = svc.config.proxy_prefix
    back = f"&rd={quote(_rd(request), safe='')}" if _rd_given(request) else ""
    action = html.escape(f"{prefix}/sign_out?everywhere=true{back}", quote=True)
    return _page(
        request,
        "Sign out everywhere?",
        "<p>This ends your sessions in every browser and every connected application (command-line tools, "
        "MCP clients), not only here.</p>"
        f"<form method='post' action='{action}'>{everywhere_field(svc, request.cookies.get(svc.config.cookie_name))}"
        "<div class='buttons'><button type='submit'>Sign out everywhere</button></div></form>",
    )


def everywhere_field(svc: Services, cookie: str | None) -> str:
    """The hidden CSRF field of a "sign out everywhere" form for the browser holding ``cookie`` (none without
    a readable one: such a post has no session to end)."""
    try:
        sid = svc.codec.load_session(cookie, time.time()).sid if cookie else None
    except InvalidCookie:
        sid = None
    if sid is None:
        return ""
    token = html.escape(csrf.form_token(svc.config, sid, csrf.EVERYWHERE), quote=True)
    return f"<input type='hidden' name='csrf' value='{token}'>"


def _rd_given(request: web.Request) -> bool:
    return bool(request.query.get("rd") or request.headers.get("X-Auth-Request-Redirect"))


def _after_sign_out(request: web.Request, everywhere: bool) -> str:
    """Where the browser lands: the ``rd`` asked for, else the signed-out page (which says so)."""
    if _rd_given(request):
        return _rd(request)
    return services(request).config.proxy_prefix + "/signed_out" + ("?everywhere=1" if everywhere else "")


async def sign_out(request: web.Request, svc: Services) -> web.Response:
    """End the session here, revoke its refresh token at the provider, clear the cookie.

    A plain sign-out may be a GET (oauth2-proxy compatible); "everywhere" needs a same-origin POST carrying
    the confirmation form's token (``csrf.py``), bound to this browser's session."""
    everywhere = await _wants_everywhere(request)
    if everywhere and request.method != "POST":
        return _confirm_everywhere_page(request)
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        text = "403 Forbidden: cross-site sign-out refused\n"
        return pages.error(request, 403, "Refused", "A sign-out posted from another site was refused.", (), text=text)
    config = svc.config
    rd = _after_sign_out(request, everywhere)
    id_token, signed_in = None, False
    cookie = request.cookies.get(config.cookie_name)
    if cookie:
        try:
            ref = svc.codec.load_session(cookie, time.time())
            svc.codec.forget(cookie)
            session = await svc.sessions.load_fresh(ref)
        except (InvalidCookie, SessionGone):
            session = None
        if session is not None and everywhere and not await _everywhere_token_ok(request, svc, ref.sid):
            text = "403 Forbidden: sign out everywhere needs the form of this browser's session\n"
            message = "This form is not from your session (CSRF check failed). Nothing was signed out."
            return pages.error(request, 403, "Refused", message, (), text=text)
        if session is not None and everywhere:
            for before in svc.sign_out_everywhere:  # the user's CLI/MCP grants, revoked upstream
                await before(session.identity.sub)
            await svc.sessions.end_all_for_user(session.identity.sub)
        if session is not None:
            await svc.sessions.end(ref, session, reason="sign_out")
            revoked = "none"
            if session.tokens.refresh_token:
                revoked = await svc.oidc.revoke(session.tokens.refresh_token, "refresh_token")
            fields = {**logs.who(session.identity), "everywhere": everywhere, "client_ip": view_of(request).client_ip}
            logs.event("sign_out", {**fields, "refresh_token": revoked})
            id_token, signed_in = session.tokens.id_token, True
    location = rd
    if config.provider_sign_out and signed_in:
        try:
            location = await svc.oidc.end_session_url(id_token, absolute(request, rd)) or rd
        except Exception:  # noqa: BLE001 - the local sign-out already happened; never fail it here
            location = rd
    response = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    clear_session_cookie(response, config)
    return response


async def _everywhere_token_ok(request: web.Request, svc: Services, sid: str) -> bool:
    presented = (await request.post()).get("csrf", "")
    return isinstance(presented, str) and csrf.form_token_ok(svc.config, sid, csrf.EVERYWHERE, presented)


async def backchannel_logout(request: web.Request, svc: Services) -> web.Response:
    """OIDC Back-Channel Logout: the provider tells us a user's (or one provider session's) sign-out.
    The token must be recent (``iat``; ``exp`` when it has one) and its ``jti`` unseen: a replay is refused (400), so a
    captured token cannot be posted again. A token we cannot check yet (its key not fetchable right
    now, the store down) is 503 or 504, and the provider retries."""
    form = await request.post()
    token = form.get("logout_token")
    headers = {"Cache-Control": "no-store"}
    if not isinstance(token, str) or not token or len(token) > 16384:
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    try:
        claims = await svc.oidc.validate_logout_token(token)
    except TokenValidationError as exc:
        log.warning("logout token rejected", extra={"fields": {"detail": str(exc)}})
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    seen = hashlib.sha256(f"{claims['iss']}\n{claims['jti']}".encode()).hexdigest()
    if not await svc.sessions.store.remember_once("lt:" + seen, logout_token_replay_ttl(claims, time.time())):
        log.warning("logout token rejected", extra={"fields": {"detail": "replayed jti"}})
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    ended = 0
    if isinstance(claims.get("sid"), str):
        ended += await svc.sessions.end_provider_session(claims["sid"])
    if isinstance(claims.get("sub"), str) and not isinstance(claims.get("sid"), str):
        ended += await svc.sessions.end_all_for_user(claims["sub"], reason="backchannel_logout")
    log.info("back-channel logout", extra={"fields": {"sessions_ended": ended}})
    return web.Response(status=200, headers=headers)


async def auth(request: web.Request, svc: Services) -> web.Response:
    """nginx auth_request target: 202 with identity headers, 401 or 403. Never a cookie, and a redirect only for
    a front that hands the answer to the browser (``_unauthorized``). The original request is read (and its
    headers refused with 400 when they disagree, ``context.original_of``) only where it decides something:
    --fresh-auth-route, --oauth-resource, the browser's redirect."""
    key, hit = decision_key(request, svc)
    if hit is not None:
        metrics.DECISIONS.add("202")
        if svc.config.request_logging:
            request[AUTHED] = (hit.ref, hit.session)
        return web.Response(status=202, headers=hit.headers)
    if not key:  # a request with a key has only A-Z, a-z, 0-9 and "-" in its names (request_key checked)
        refuse_aliases(request.headers)  # X.Auth.Request.User... which some fronts pass on to the app
    try:
        ref, session = await authenticate(request, svc)
    except SessionGone:
        metrics.DECISIONS.add("401")
        challenge = svc.resource_guard.challenge(request) if svc.resource_guard is not None else None
        return challenge or _unauthorized(request, svc.config, None)
    config = svc.config
    query = request.rel_url.raw_query_string  # read once: most auth subrequests carry none
    if query and config.front == "envoy" and request.path != config.proxy_prefix + "/auth":
        query = ""  # ext_authz appended the original path AND its query: the client's, never the operator's rules
    denied = why_denied(session.identity, config)
    if denied is None and query and not _location_allows(query, session.identity):
        denied = "location_rule"
    if denied is not None:
        metrics.DECISIONS.add("403")
        _log_denial(request, session.identity, denied, "/oauth2/auth")
        return web.Response(status=403, text="403 Forbidden\n")
    max_age = _auth_max_age(request, query, config)
    if max_age is not None and is_stale(session.auth_time, max_age, time.time()):
        metrics.DECISIONS.add("401")  # RFC 9470: sign in again, recently; the session itself stays
        return _unauthorized(request, config, max_age)
    metrics.DECISIONS.add("202")
    headers = _accepted(request, session, config)
    if key:
        remember(request, svc, key, ref, session, max_age, headers)
    return web.Response(status=202, headers=headers)


def decision_key(request: web.Request, svc: Services) -> tuple[Key, Decision | None]:
    """This request's key (``()``: not cacheable) and the cached answer for it, if any. The lean listener
    looked the key up already and left it on the request (``DECISION_KEY``): no second lookup then."""
    known = request.get(DECISION_KEY)
    if known is not None:
        return known, None
    # The raw path, not aiohttp's decoded one: envoy's decision reads the raw tail, so /oauth2/%61uth (decoded to
    # /oauth2/auth) is another request; and envoy's /oauth2/auth/<original path>: an input the key does not hold
    if svc.decisions is None or request.raw_path.partition("?")[0] != svc.config.proxy_prefix + "/auth":
        return (), None
    trusted = trusted_peer(request.remote, svc.config)
    key = request_key(request.method, request.headers.items(), request.rel_url.raw_query_string, trusted, svc.config)
    if key is None:
        return (), None
    return key, svc.decisions.get(key)


def remember(
    request: web.Request,
    svc: Services,
    key: Key,
    ref: SessionRef,
    session: Session,
    max_age: int | None,
    headers: CIMultiDict[str],
) -> None:
    """Keep this 202 (``headers``: what the answer was made from, never changed afterwards) for the next
    requests with the same key, when the session cookie made it."""
    if svc.decisions is None or ref is BEARER_REF or not svc.decisions.admit(key) or request.get(BY_SIDECAR_TOKEN):
        return  # (admit first: the request's table raises and catches a KeyError for an absent key)
    config = svc.config
    cookie = read_cookie(request, config.cookie_name)
    svc.decisions.put(
        key,
        headers,
        ref,
        session,
        max_age=max_age,
        cookie_until=svc.codec.session_valid_until(cookie) if cookie else None,
        forwarded_ip=forwarded_client_ip(request, config) if key[2] == "t" else None,  # a trusted peer
    )


def _accepted(request: web.Request, session: Session, config: Config) -> CIMultiDict[str]:
    """The 202's identity headers; the token headers only for a trusted front. aiohttp copies them into the
    response, so the object may be shared (per session) and kept by the decision cache."""
    if tokens_allowed(request, config):
        cookie = request.headers.get("Cookie")
        if cookie is not None:
            # For ingress-nginx's auth-response-headers "Cookie": the app's cookies without ours,
            # so the session cookie never reaches the app, with no snippet annotation.
            headers = {
                **auth_response_headers_for(session, config),
                "Cookie": without_sidecar_cookies(cookie, config.cookie_name),
            }
            return CIMultiDict(headers)
        return _prebuilt(session, config, True)
    return _prebuilt(session, config, False)


def _prebuilt(session: Session, config: Config, with_tokens: bool) -> CIMultiDict[str]:
    """The 202's identity headers as the CIMultiDict aiohttp copies them from, built once per session object
    and kept on it (a cached session answers many requests; copying a CIMultiDict is a third of building one
    from a dict). Without ``with_tokens`` the token headers are left out: only a trusted front may read them.
    aiohttp copies the headers into each response, so the shared object is never changed."""
    name = "auth_multidict_tokens" if with_tokens else "auth_multidict"
    built: CIMultiDict[str] | None = session.derived.get(name)
    if built is None:
        headers = auth_response_headers_for(session, config)
        if not with_tokens:
            headers = {k: v for k, v in headers.items() if k not in TOKEN_HEADERS}
        built = session.derived[name] = CIMultiDict(headers)
    return built


def _log_denial(request: web.Request, identity: Identity, reason: str, route: str) -> None:
    """Why someone signed in was refused: ``email_domain``, ``group`` or ``location_rule`` (an auth-url query)."""
    fields = {**logs.who(identity), "reason": reason, "route": route, "client_ip": view_of(request).client_ip}
    logs.event("denied", fields)


def _unauthorized(request: web.Request, config: Config, max_age: int | None) -> web.Response:
    """401 (with RFC 9470's challenge for a step-up): nginx and ingress-nginx send browsers to sign in with
    their error_page / auth-signin. A front that hands the auth answer to the client as it is (Traefik,
    Caddy, Envoy) gets the browser's redirect from here instead, back to the original URI its own headers
    name; API clients (not GET/HEAD text/html, or an --api-route) still get the 401."""
    original = original_of(request) if FRONTS[config.front].relays else None
    if original is not None and original.uri is not None and original.path is not None:
        browser = original.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")
        if browser and not any(pattern.search(original.path) for pattern in config.api_routes):
            view = view_of(request)  # absolute: Traefik resolves a relative Location against the auth URL
            prefix = f"{view.scheme}://{view.host}{config.proxy_prefix}"
            rd = original.uri
            location = start_url(prefix, max_age, rd) if max_age else f"{prefix}/start?rd={quote(rd, safe='')}"
            return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    if max_age is not None:
        return step_up_unauthorized(max_age)
    return web.Response(status=401, text="401 Unauthorized\n")


def _auth_max_age(request: web.Request, query: str, config: Config) -> int | None:
    """The strictest of the auth-url's ``max_age`` (in its raw ``query``) and the ``--fresh-auth-route`` rules
    matching the original request, which only a trusted front can name, in its own headers (``fronts``)."""
    ages = [location_rules(query).max_age] if query else []
    if config.fresh_routes:
        ages.append(_original_request_max_age(original_of(request), config))
    known = [age for age in ages if age is not None]
    return min(known) if known else None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _original_request_max_age(original: Original, config: Config) -> int | None:
    """``--fresh-auth-route`` for the request the front asks about, with the proxy's path normalisation. A path
    the normalisation refuses gets the strictest rule, and so does a path without a method: never less than a
    matching rule could have asked."""
    if original.path is None:
        return None
    try:
        path = normalise_path(original.path or "/")
    except (BadRequest, ValueError):
        return min(rule.max_age for rule in config.fresh_routes)
    methods = (original.method,) if original.method else _METHODS
    ages = [age for age in (required_max_age(config.fresh_routes, m, path) for m in methods) if age is not None]
    return min(ages) if ages else None


def _location_allows(query: str, identity: Identity) -> bool:
    """The ``auth-url``'s own rules (``?allowed_groups=...``, the raw query); a query it does not understand
    denies. Not called without a query: no rules then."""
    rules = location_rules(query)
    if rules.problem is not None:
        log.error("auth-url query refused; fix the auth-url", extra={"fields": {"problem": rules.problem}})
    return rules.allows(identity)


async def userinfo(request: web.Request, svc: Services) -> web.Response:
    try:
        _, session = await authorize(request, svc)
    except SessionGone:
        return web.json_response({"error": "not signed in"}, status=401)
    ident, tokens = session.identity, session.tokens
    return web.json_response(
        {
            "user": ident.user,
            "email": ident.email,
            "groups": list(ident.groups),
            "preferred_username": ident.preferred_username,
            "access_token_expires_at": tokens.access_expires_at,
            "refresh_count": session.refresh_count,
            "signed_in_at": session.signed_in_at,
        },
        headers={"Cache-Control": "no-store"},
    )


async def ping(request: web.Request, svc: Services) -> web.Response:
    return web.Response(text="OK\n")


async def ready(request: web.Request, svc: Services) -> web.Response:
    """Ready when the store answers and the provider's discovery document was fetched (once is enough)."""
    try:
        await svc.sessions.store.ping()
    except StoreUnavailable:
        return web.Response(status=503, text="session store unreachable\n")
    try:
        await svc.oidc.metadata()
    except ProviderError as exc:
        log.error(
            "identity provider not usable: check --oidc-issuer-url",
            extra={"fields": {"issuer": svc.config.oidc_issuer_url, "error": type(exc).__name__, "detail": str(exc)}},
        )
        return web.Response(status=503, text=f"identity provider unreachable or not an OIDC issuer: {exc}\n")
    return web.Response(text="OK\n")


async def metrics_page(request: web.Request, svc: Services | None = None) -> web.Response:
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application, config: Config, with_metrics: bool) -> None:
    """The endpoints under ``--proxy-prefix`` and at ``--ping-path`` / ``--ready-path``. Metric and log
    labels keep the default names (``/oauth2/auth``...), so dashboards do not depend on the prefix."""
    prefix = config.proxy_prefix
    routes = [
        ("GET", "/oauth2/start", start),
        ("GET", "/oauth2/callback", callback),
        ("GET", "/oauth2/sign_in", sign_in),
        ("*", "/oauth2/sign_out", sign_out),
        ("*", "/oauth2/auth", auth),
        ("GET", "/oauth2/userinfo", userinfo),
        ("POST", "/oauth2/backchannel_logout", backchannel_logout),
    ]
    paths = [prefix + label.removeprefix("/oauth2") for _, label, _ in routes]
    routes += [("GET", "/ping", ping), ("GET", "/ready", ready)]
    paths += [config.ping_path, config.ready_path]
    if with_metrics:
        routes.append(("GET", "/metrics", metrics_page))
        paths.append("/metrics")
    if config.front == "envoy":  # ext_authz appends the original path to the auth URL's
        routes.append(("*", "/oauth2/auth", auth))
        paths.append(prefix + "/auth/{tail:.*}")
    for (method, label, handler), path in zip(routes, paths, strict=True):
        if method == "GET":
            app.router.add_get(path, guarded(handler, label))  # HEAD too, for probes
        else:
            app.router.add_route(method, path, guarded(handler, label))
