"""A browser session's device card: what a person recognises it by on the account page.

Session records are encrypted with a key only their own cookie holds, so at sign-in the card (the device in
words from the User-Agent, the address, the time) is kept beside the record, in the store's short-lived
values under ``acct:<record key>``, for as long as the cookie can live, encrypted with a key derived from
the cookie secret and the user's ``sub``: readable by that user's account page only, never in clear in the
store.

The card also holds the session's record key. Ending a session from the account page must revoke its
upstream refresh token as sign-out does (it may be an ``offline_access`` token that lives for months at the
provider), and only that key opens the record holding the token. So whoever holds both the cookie secret
and the store can read a session's tokens, as with a CLI/MCP grant's record (``oauth/ending.py``); the
session id stays out of the card, so the cookie itself still cannot be rebuilt from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

from aiohttp import web

from . import crypto
from .config import Config
from .context import Services, view_of
from .cookies import SessionRef
from .errors import InvalidCookie

CARD = "acct:"


@dataclass(frozen=True)
class Card:
    """What a person recognises a browser session by."""

    device: str
    address: str
    signed_in_at: float
    session_key: bytes | None = None  # None on cards written before the key was kept


def describe_device(user_agent: str) -> str:
    """``Firefox on Linux``, ``Safari on iPhone``, ``curl``: the browser and system in words."""
    ua = user_agent or ""
    browser = next((label for pattern, label in _BROWSERS if re.search(pattern, ua)), "")
    system = next((label for pattern, label in _SYSTEMS if re.search(pattern, ua)), "")
    if browser and system:
        return f"{browser} on {system}"
    return browser or (f"A browser on {system}" if system else "An unknown browser or program")


_BROWSERS = (
    (r"Edg/", "Edge"),
    (r"OPR/|Opera", "Opera"),
    (r"Firefox/", "Firefox"),
    (r"Chrom(e|ium)/", "Chrome"),
    (r"Safari/", "Safari"),
    (r"^curl/", "curl"),
    (r"^python|aiohttp|httpx", "a Python program"),
)
_SYSTEMS = (
    (r"iPhone", "iPhone"),
    (r"iPad", "iPad"),
    (r"Android", "Android"),
    (r"Windows", "Windows"),
    (r"Mac OS X|Macintosh", "macOS"),
    (r"CrOS", "ChromeOS"),
    (r"Linux", "Linux"),
)


def _card_key(config: Config, sub: str, secret: bytes | None = None) -> bytes:
    key = secret if secret is not None else config.cookie_secrets[0]
    return hmac.new(key, b"sidecar.account.card\0" + sub.encode(), hashlib.sha256).digest()


async def remember_device(request: web.Request, svc: Services, ref: SessionRef, sub: str) -> None:
    """Keep the new browser session's card, for as long as its cookie can live."""
    card = {
        "device": describe_device(request.headers.get("User-Agent", "")[:400]),
        "address": view_of(request).client_ip,
        "at": time.time(),
        "key": base64.b64encode(ref.key).decode(),
    }
    blob = crypto.encrypt(_card_key(svc.config, sub), json.dumps(card).encode(), ref.store_key.encode())
    await svc.sessions.store.put_outcome(CARD + ref.store_key, blob, float(svc.config.cookie_expire))


def open_card(config: Config, sub: str, key: str, blob: bytes) -> Card | None:
    for secret in config.cookie_secrets:
        try:
            card = json.loads(crypto.decrypt(_card_key(config, sub, secret), blob, key.encode()))
            session_key = base64.b64decode(card["key"], validate=True) if "key" in card else None
            return Card(str(card["device"]), str(card["address"]), float(card["at"]), session_key)
        except (InvalidCookie, ValueError, KeyError, TypeError, binascii.Error):
            continue
    return None
