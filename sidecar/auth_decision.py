"""``/oauth2/auth``: the decision a front asks for on every request (202 with identity headers, 401, 403),
and what the decision cache keeps of it."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from . import logs, metrics
from .auth_request import AuthRequest
from .bearer import MalformedAuthorization
from .config import Config
from .context import (
    AUTHED,
    BY_SIDECAR_TOKEN,
    DECISION_KEY,
    Services,
    forwarded_client_ip,
    original_of,
    trusted_peer,
    view_of,
)
from .cookies import SessionRef, without_sidecar_cookies
from .decisions import Decision, Key, header_lists, key_trusted, request_key
from .errors import BadRequest, SessionGone
from .fronts import FRONTS, Original, refuse_aliases
from .guard import BEARER_REF, TOKEN_HEADERS, authenticate, cookie_header, read_cookie, tokens_allowed
from .headers import auth_response_headers_for
from .hits import handed_key
from .location_rules import location_rules
from .models import Identity, Session
from .policy import why_denied
from .proxy import normalise_path
from .stepup import is_stale, required_max_age, start_url
from .stepup import unauthorized as step_up_unauthorized

log = logging.getLogger("sidecar.handlers")


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
    except MalformedAuthorization as exc:  # 400 is no answer to an auth subrequest (bearer.MalformedAuthorization)
        metrics.DECISIONS.add("401")
        raise exc.unauthorized from None
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
        log_denial(request, session.identity, denied, "/oauth2/auth")
        return web.Response(status=403, text="403 Forbidden\n")
    max_age = _auth_max_age(request, query, config)
    if max_age is not None and is_stale(session.auth_time, max_age, time.time()):
        metrics.DECISIONS.add("401")  # RFC 9470: sign in again, recently; the session itself stays
        return _unauthorized(request, config, max_age)
    metrics.DECISIONS.add("202")
    headers = _accepted(request, session, config)
    if request.get(BY_SIDECAR_TOKEN) or config.fresh_routes:
        # Bound to the host and resource asked about, which a front's auth cache may not key by (ingress-nginx's
        # auth-cache-key is prefixed with the server's host: "*.example.com" for a wildcard Ingress): kept
        # nowhere, as in our own cache (``remember``). ingress-nginx's auth cache obeys no-store. With
        # --fresh-auth-route a cookie's answer depends on the path too, which a cookie-keyed front cache
        # does not hold: a 202 for /docs must not answer for /admin/delete. (deploy/nginx/auth-cache.conf
        # ignores Cache-Control and never caches a bearer request; its comments forbid it with step-up.)
        headers = CIMultiDict(headers)
        headers["Cache-Control"] = "no-store"
    if key:
        remember(request, svc, key, ref, session, max_age, headers)
    return web.Response(status=202, headers=headers)


def decision_key(request: web.Request, svc: Services) -> tuple[Key, Decision | None]:
    """This request's key (``()``: not cacheable) and the cached answer for it, if any. A listener that looked
    the key up already hands it over (the lean one on the request, ``DECISION_KEY``; the main one on its
    parser, ``hits.handed_key``): no second lookup then."""
    decisions = svc.decisions
    if decisions is None:
        return (), None
    known = request.get(DECISION_KEY) if isinstance(request, AuthRequest) else handed_key(request)
    if known is not None:
        return known, None
    # The raw path, not aiohttp's decoded one: envoy's decision reads the raw tail, so /oauth2/%61uth (decoded to
    # /oauth2/auth) is another request; and envoy's /oauth2/auth/<original path>: an input the key does not hold
    path, _, query = request.raw_path.partition("?")  # the query as sent, a "#..." included (fronts reads it)
    if path != svc.config.proxy_prefix + "/auth":
        return (), None
    trusted = trusted_peer(request.remote, svc.config)
    headers = request.headers
    names, values = header_lists(headers)
    key = request_key(request.method, names, values, query, trusted, svc.config)
    if key is None:
        return (), None
    return key, decisions.get(key)


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
    passed = headers.get("Cookie")  # the app's cookies, passed back to a trusted front (_accepted)
    if passed is not None and not passed.isascii() and not _encodable(passed):
        return  # undecodable bytes: aiohttp drops them (its C writer) or fails (its Python one); a hit would send them
    config = svc.config
    cookie = read_cookie(request, config.cookie_name)
    svc.decisions.put(
        key,
        headers,
        ref,
        session,
        max_age=max_age,
        cookie_until=svc.codec.session_valid_until(cookie) if cookie else None,
        forwarded_ip=forwarded_client_ip(request, config) if key_trusted(key) else None,
    )


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _accepted(request: web.Request, session: Session, config: Config) -> CIMultiDict[str]:
    """The 202's identity headers; the token headers only for a trusted front. aiohttp copies them into the
    response, so the object may be shared (per session) and kept by the decision cache."""
    if tokens_allowed(request, config):
        cookie = cookie_header(request.headers)  # several Cookie headers: joined (RFC 9113 8.2.3)
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


def log_denial(request: web.Request, identity: Identity, reason: str, route: str) -> None:
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
