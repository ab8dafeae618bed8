"""Sign-in: ``/oauth2/start``, ``/oauth2/callback`` and the sign-in page; each attempt sealed in its own cookie."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from urllib.parse import quote, urlsplit

from aiohttp import web

from . import devices, kit, logs, metrics, pages
from .auth_decision import log_denial
from .config import Config
from .context import Services, services, view_of
from .cookies import CLOCK_LEEWAY, MAX_COOKIE_CHARS, SignInAttempt, state_cookie_suffix
from .errors import BadRequest, InvalidCookie, InvalidState, StoreUnavailable, TokenValidationError
from .guard import callback_url, clear_cookie, read_cookie, request_cookies, set_cookie
from .models import TokenSet
from .oidc import Pkce
from .paths import normalise_path
from .policy import identity_from_claims, why_denied
from .ratelimit import retry_after
from .stepup import callback_problem, parse_max_age, required_max_age
from .urls import safe_redirect

log = logging.getLogger("sidecar.handlers")

STATE_TTL = 600.0  # a sign-in attempt must finish within ten minutes
MAX_ATTEMPT_COOKIES = 5  # live sign-in attempts (tabs) per browser; older ones are cleared at /oauth2/start
PARALLEL_TABS_WINDOW = 120.0  # at a successful callback, attempts younger than this may be other tabs: kept
_CALLBACK_SINGLE = ("state", "code", "iss", "error")  # RFC 6749 3.1: a parameter may not be repeated


def redirect_target(request: web.Request) -> str:
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
    for name, value in request_cookies(request).items():
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
    rd = redirect_target(request)
    return await begin_sign_in(request, svc, rd, max_age=_start_max_age(request, svc.config, rd))


async def begin_sign_in(
    request: web.Request,
    svc: Services,
    rd: str,
    *,
    max_age: int | None = None,
    purpose: str = "",
    scope: str | None = None,
    offline: bool = False,
    acr_values: str | None = None,
) -> web.Response:
    """The redirect to the provider, with this attempt sealed in its own cookie. ``purpose`` ("kind:id")
    hands the callback's tokens to ``svc.sign_in_finishers[kind]`` instead of making a browser session;
    ``scope`` replaces ``--scope`` for this sign-in (``sidecar.oauth`` adds ``offline_access``); ``offline``: it
    needs a refresh token (``OidcClient.authorize_url``); ``acr_values`` is asked of the provider as it is (the
    finisher checks the ``acr`` it gets, ``sidecar.oauth.acr``)."""
    state, nonce, pkce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), Pkce.new()
    redirect_uri = callback_url(request, svc.config)  # sealed in the attempt: the code exchange sends the same
    attempt = SignInAttempt(state, pkce.verifier, nonce, rd, redirect_uri, max_age=max_age, purpose=purpose)
    url = await svc.oidc.authorize_url(
        state,
        nonce,
        pkce,
        redirect_uri=redirect_uri,
        max_age=max_age,
        scope=scope,
        offline=offline,
        acr_values=acr_values,
    )
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
    attempt = svc.codec.load_attempt(read_cookie(request, cookie_name), state, time.time(), STATE_TTL)
    if issuer is None and (await svc.oidc.metadata()).iss_in_responses:
        # RFC 9207 2.4: a provider that says it names itself in every answer did not send this one (mix-up)
        raise InvalidState("callback lacks the iss its provider always sends (RFC 9207)")
    # Before the state is used up: the same callback, reloaded once the provider's Retry-After pause is over (our
    # 503 says when), still signs in; the code was not sent, so it is still good.
    svc.oidc.raise_if_token_paused()
    await _claim(svc, state, STATE_TTL + CLOCK_LEEWAY)
    tokens = await svc.oidc.exchange_code(code, attempt.verifier, attempt.redirect_uri)
    if not tokens.id_token:
        raise TokenValidationError("token response has no id_token")
    claims = await svc.oidc.validate_id_token(tokens.id_token, nonce=attempt.nonce)
    stale = None if attempt.max_age is None else callback_problem(claims, attempt.max_age, time.time())
    if stale is not None:
        await _drop_unused(svc, attempt, tokens)
        return _step_up_refused(request, config, cookie_name, stale)
    identity = identity_from_claims(claims, config)
    denied = why_denied(identity, config)
    if denied is not None:
        await _drop_unused(svc, attempt, tokens)
        metrics.DECISIONS.add("403")
        log_denial(request, identity, denied, "/oauth2/callback")
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


async def _drop_unused(svc: Services, attempt: SignInAttempt, tokens: TokenSet) -> None:
    """A grant's sign-in (``purpose``) refused here leaves an upstream refresh token nobody will ever use (asked
    with offline_access or Google's access_type=offline: valid for months): revoked, as the grant finisher does
    when it makes no grant (best effort, never raises). A browser sign-in's is left alone: revoking it could end
    the provider session the browser's current sidecar session still refreshes with."""
    if attempt.purpose and tokens.refresh_token:
        outcome = await svc.oidc.revoke(tokens.refresh_token, "refresh_token")
        logs.event("sign_in_tokens_dropped", {"purpose": attempt.purpose.partition(":")[0], "refresh_token": outcome})


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
    old = read_cookie(request, svc.config.cookie_name)
    if not old:
        return
    try:
        ref = svc.codec.load_session(old, time.time())
        await svc.sessions.end(ref, None, reason="replaced")
    except (InvalidCookie, StoreUnavailable):
        pass


async def sign_in(request: web.Request, svc: Services) -> web.Response:
    """The sign-in page, from the built-in or the operator's ``sign_in.html`` (values escaped there)."""
    rd = redirect_target(request)
    href = f"{svc.config.proxy_prefix}/start?rd={quote(rd, safe='')}"
    text = svc.config.pages.render("sign_in", title="Sign in", sign_in_url=href, redirect=rd)
    return web.Response(text=text, content_type="text/html", headers=_built_in_headers(svc.config, "sign_in"))


def _built_in_headers(config: Config, name: str) -> dict[str, str] | None:
    """The kit's strict headers (CSP by the stylesheet's hash) on the kit's pages; an operator's own template
    may carry its own styles, so it keeps the headers it had."""
    return kit.HEADERS if config.pages.built_in(name) else None
