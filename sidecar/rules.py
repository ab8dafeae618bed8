"""Parsed access rules: route rules, redirect host rules and email-domain rules.

Each rule is parsed once at start-up from its text, and a text that does not parse is a
``ConfigError``: a rule is never accepted and then silently unable to match. Matching
takes already-normalised input (a normalised path, a lower-case host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
# \Z, never $: "$" also matches before a final newline, and "example.com\n" is no host name.
_METHOD_PREFIX = re.compile(r"\A([A-Za-z]+)(!?=)(.*)\Z", re.DOTALL)
_HOST_LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_PORT = re.compile(r"\A[0-9]{1,5}\Z")
# A regex that matches the empty string matches at the start of every path: a stray "|" or a
# ".*" made the whole site public by accident. An intended "^/" still reads as what it is.
_PROBES = ("",)


@dataclass(frozen=True)
class Route:
    """``[METHOD=]REGEX`` or ``METHOD!=REGEX`` (every method but METHOD), as oauth2-proxy writes them.

    The regex is searched in the normalised path, as in oauth2-proxy: anchor it with ``^``."""

    text: str
    method: str | None
    negate: bool
    pattern: re.Pattern[str]

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and (method == self.method) == self.negate:
            return False
        return self.pattern.search(path) is not None


def parse_route(text: str, option: str, *, refuse_match_all: bool = False) -> Route:
    """One route rule; never split, so ``{1,3}`` and ``,`` inside a regex mean what they say.

    ``refuse_match_all`` for rules that open routes: a stray ``|`` (``^/x|``) or ``.*`` would
    make the whole site public, so a regex that matches even the empty string is refused."""
    method: str | None = None
    negate = False
    pattern = text
    prefix = _METHOD_PREFIX.match(text)
    if prefix:
        word, op, rest = prefix.groups()
        if word.upper() not in HTTP_METHODS:
            raise ConfigError(f"--{option}: {word!r} is not an HTTP method in {text!r} (write METHOD=REGEX)")
        method, negate, pattern = word.upper(), op == "!=", rest
    if not pattern:
        raise ConfigError(f"--{option}: empty regex in {text!r} would match every path")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--{option}: bad regex {pattern!r}: {exc}") from None
    if refuse_match_all and any(compiled.search(probe) for probe in _PROBES):
        raise ConfigError(
            f"--{option}: regex {pattern!r} matches every path, even an empty one (anchor it, e.g. ^/public/)"
        )
    return Route(text=text, method=method, negate=negate, pattern=compiled)


def valid_hostname(host: str) -> bool:
    """A DNS name of ASCII labels (already lower-cased), or an IPv4 literal."""
    if not host or len(host) > 253:
        return False
    return all(_HOST_LABEL.match(label) for label in host.split("."))


@dataclass(frozen=True)
class HostRule:
    """A ``--whitelist-domain`` entry, with oauth2-proxy's meaning.

    ``host`` the default ports only; ``host:8443`` that port; ``host:*`` any port;
    a leading ``.`` or ``*.`` the domain's subdomains (and, as in oauth2-proxy, the domain itself)."""

    domain: str
    subdomains: bool
    port: int | None  # None: the scheme's default port only
    any_port: bool

    def allows(self, host: str, port: int, default_port: int) -> bool:
        if self.subdomains:
            if host != self.domain and not host.endswith("." + self.domain):
                return False
        elif host != self.domain:
            return False
        if self.any_port:
            return True
        return port == (self.port if self.port is not None else default_port)


def parse_host_rule(text: str, option: str = "whitelist-domain") -> HostRule:
    entry = text.strip().lower()
    if "://" in entry or "/" in entry or "@" in entry:
        raise ConfigError(f"--{option}: {text!r} must be a host, not a URL (e.g. app.example.com or .example.com)")
    subdomains = entry.startswith((".", "*."))
    entry = entry[2:] if entry.startswith("*.") else entry.lstrip(".") if subdomains else entry
    host, port, any_port = entry, None, False
    if entry.startswith("["):
        raise ConfigError(f"--{option}: IP literals are not supported in {text!r}; use a host name")
    if ":" in entry:
        host, _, port_text = entry.partition(":")
        if port_text == "*":
            any_port = True
        elif _PORT.match(port_text) and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise ConfigError(f"--{option}: bad port in {text!r} (use host, host:port or host:*)")
    host = host.rstrip(".")
    if not valid_hostname(host) or "*" in host:
        raise ConfigError(f"--{option}: {text!r} is not a host name (wildcards only as a leading '*.')")
    return HostRule(domain=host, subdomains=subdomains, port=port, any_port=any_port)


@dataclass(frozen=True)
class DomainRule:
    """An ``--email-domain`` entry: ``example.com`` exactly, ``.example.com``/``*.example.com``
    its subdomains only, ``*`` any address."""

    domain: str  # "*" for any
    subdomains: bool

    def allows(self, email_domain: str) -> bool:
        if self.domain == "*":
            return True
        if self.subdomains:
            return email_domain.endswith("." + self.domain)
        return email_domain == self.domain


def parse_domain_rule(text: str, option: str = "email-domain") -> DomainRule:
    entry = text.strip().lower()
    if entry == "*":
        return DomainRule(domain="*", subdomains=False)
    entry = entry[1:] if entry.startswith("@") else entry
    subdomains = entry.startswith((".", "*."))
    entry = entry[2:] if entry.startswith("*.") else entry[1:] if subdomains else entry
    if not valid_hostname(entry):
        raise ConfigError(f"--{option}: {text!r} is not a domain (use example.com, .example.com or *)")
    return DomainRule(domain=entry, subdomains=subdomains)
