"""Read settings from flags, the environment and a TOML file, and build the Config.

Precedence: flags beat environment, environment beats file, file beats default. Names are
the options of ``config.Config``, plus oauth2-proxy's spellings (plural list keys such as
``email_domains``; ``OAUTH2_PROXY_*`` variables), so an oauth2-proxy set-up carries over.
Anything not understood stops start-up with one line naming it, with a "did you mean" when a
known name is close: a misspelt restriction must never vanish without a word.

How lists are written:
- flags: repeat the flag; plain lists (domains, groups, URLs) may also be comma-separated,
  regex lists (``--skip-auth-route``) never are: one flag, one rule;
- TOML: an array, one element per item (never split), or a string as for a flag;
- environment: a JSON array (``["GET=^/a/[0-9]{1,3}$", "^/health$"]``), or for plain lists a
  comma list, for regex lists one rule per line. A one-line regex value with a comma is
  refused: it cannot be told apart from oauth2-proxy's comma lists.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import BY_ATTR, OPTIONS, Config, Option, build_config, parse_bool
from .errors import ConfigError

ENV_PREFIXES = ("SIDECAR_", "OAUTH2_PROXY_")

# Kubernetes service links: for every Service in the namespace (a Service named oauth2-proxy or sidecar is
# usual) the kubelet sets <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<port name>], <NAME>_PORT and
# <NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]. Recognised by name shape AND value shape, never by name alone,
# and the values as strictly as the kubelet writes them: a real IP address (IPv6 in brackets inside a URL),
# a port from 1 to 65535, and the port number and protocol the name itself carries.
_LINK_URL = re.compile(r"(tcp|udp|sctp)://(?:\[([0-9a-f:.]+)\]|([0-9.]+)):([0-9]{1,5})")
_LINK_PROTOS = r"(TCP|UDP|SCTP)"


def _link_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text and (version is None or address.version == version)


def _link_port(text: str, want: str | None = None) -> bool:
    return re.fullmatch(r"[1-9][0-9]{0,4}", text) is not None and int(text) <= 65535 and want in (None, text)


def _link_url(text: str, proto: str | None = None, port: str | None = None) -> bool:
    found = _LINK_URL.fullmatch(text)
    if found is None or proto not in (None, found[1]):
        return False
    address_ok = _link_ip(found[2], 6) if found[2] is not None else _link_ip(found[3], 4)
    return address_ok and _link_port(found[4], port)


_SERVICE_LINK: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], str], bool]], ...] = (
    (re.compile(r"[A-Z0-9_]+_SERVICE_HOST"), lambda _, v: _link_ip(v)),
    (re.compile(r"[A-Z0-9_]+_SERVICE_PORT(?:_[A-Z0-9_]+)?"), lambda _, v: _link_port(v)),
    (re.compile(r"[A-Z0-9_]+_PORT"), lambda _, v: _link_url(v)),
    (re.compile(rf"[A-Z0-9_]+_PORT_([0-9]+)_{_LINK_PROTOS}"), lambda m, v: _link_url(v, m[2].lower(), m[1])),
    (re.compile(rf"[A-Z0-9_]+_PORT_([0-9]+)_{_LINK_PROTOS}_PROTO"), lambda m, v: v == m[2].lower()),
    (re.compile(rf"[A-Z0-9_]+_PORT_([0-9]+)_{_LINK_PROTOS}_PORT"), lambda m, v: _link_port(v, m[1])),
    (re.compile(rf"[A-Z0-9_]+_PORT_([0-9]+)_{_LINK_PROTOS}_ADDR"), lambda _, v: _link_ip(v)),
)
_ENV_NOT_OPTIONS = frozenset({"SIDECAR_CONFIG", "OAUTH2_PROXY_CONFIG"})

# oauth2-proxy options that need no setting here: accepted with a one-line notice.
NEEDLESS = {
    "skip_provider_button": "the sidecar has no provider button page; browsers go straight to the provider",
    "proxy_websockets": "WebSockets are always proxied",
}

# oauth2-proxy options the sidecar does not have, and what to do instead.
NOT_HERE = {
    "cookie_csrf_per_request": "sign-in cookies are always per attempt here",
    "cookie_csrf_expire": "sign-in attempts always expire after 10 minutes",
    "session_cookie_minimal": "sessions are always server-side; the cookie is always minimal",
    "provider_display_name": "there is no provider button page",
    "login_url": "use --oidc-issuer-url; endpoints come from discovery",
    "redeem_url": "use --oidc-issuer-url; endpoints come from discovery",
    "oidc_jwks_url": "use --oidc-issuer-url; endpoints come from discovery",
    "skip_oidc_discovery": "discovery is required; point --oidc-issuer-url at the provider",
    "htpasswd_file": "only OpenID Connect sign-in is supported",
    "authenticated_emails_file": "use --email-domain and --allowed-group",
    "pass_basic_auth": "not supported: the upstream gets identity headers instead",
    "pass_host_header": "the Host header is always passed",
}


def _by_name() -> dict[str, Option]:
    """Every accepted spelling (snake case) -> its option."""
    names: dict[str, Option] = {}
    for opt in OPTIONS:
        names[opt.attr] = opt
        for alias in opt.aliases:
            names[alias] = opt
    return names


_NAMES = _by_name()


def _needless(name: str, value: Any, shown: str, problems: list[str], notices: list[str]) -> None:
    """These oauth2-proxy switches describe what the sidecar always does: "true" gets a notice,
    anything else asks for something the sidecar cannot do, and is refused."""
    try:
        wanted = value if isinstance(value, bool) else parse_bool(str(value))
    except ValueError:
        wanted = False
    if wanted:
        notices.append(f"{shown}: {NEEDLESS[name]}; ignored")
    else:
        problems.append(f"{shown}: {NEEDLESS[name]}, so it cannot be turned off; remove the setting")


# List options whose empty value has a meaning of its own that restricts nothing: allowed empty.
EMPTY_MEANS = {"upstream": "no upstream: the sidecar only answers a front's /oauth2/auth"}


def _empty(opt: Option, value: Any, shown: str, problems: list[str]) -> bool:
    """The one rule for "empty": a list option set to nothing (``--allowed-group ""``, ``SIDECAR_X=``,
    ``" , "``, TOML ``[]``) is refused, never read as "no restriction". Leaving it out is how to say none.
    (``EMPTY_MEANS`` lists the options where empty is itself a documented setting.)"""
    if opt.attr in EMPTY_MEANS:
        return False
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        return False  # the type check names that problem
    parts = [part for item in items for part in (item.split(",") if opt.kind == "names" else [item])]
    if any(part.strip() for part in parts):
        return False
    problems.append(f"{shown}: set but empty; remove the setting to leave --{opt.name} unset")
    return True


def _unknown(name: str, shown: str) -> str:
    """``shown``: the name as the user wrote it; with the closest known spelling when there is one."""
    if name in NOT_HERE:
        return f"{shown}: oauth2-proxy option not supported here: {NOT_HERE[name]}"
    close = difflib.get_close_matches(name, list(_NAMES), n=1, cutoff=0.75)
    hint = f" (did you mean {_spell_like(shown, close[0])}?)" if close else ""
    return f"{shown}: unknown option{hint}"


def _spell_like(shown: str, attr: str) -> str:
    for prefix in ENV_PREFIXES:
        if shown.startswith(prefix):
            return prefix + attr.upper()
    if shown.startswith("--"):
        return "--" + attr.replace("_", "-")
    return attr


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"sidecar: error: {message}\n")
        raise SystemExit(2)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sidecar",
        allow_abbrev=False,  # "--cookie-sec" must not quietly mean one of two options
        description="OAuth2 / OpenID Connect authentication proxy. Every flag can also be set "
        "as SIDECAR_<NAME> in the environment or as <name> in the --config TOML file.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (flags and env win)")
    for opt in OPTIONS:
        default = opt.shown(opt.default)
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        text = f"{opt.help} [default: {default}] [env: {opt.env}]"
        flags = [f"--{opt.name}"] + [f"--{a.replace('_', '-')}" for a in opt.aliases]
        if opt.kind == "bool":
            parser.add_argument(*flags, dest=opt.attr, nargs="?", const="true", metavar="BOOL", help=text)
        elif opt.kind in ("names", "patterns"):
            parser.add_argument(*flags, dest=opt.attr, action="append", help=text)
        else:
            parser.add_argument(*flags, dest=opt.attr, help=text)
    for name in NEEDLESS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest="needless_" + name, nargs="?", const="true",
                            help=argparse.SUPPRESS)  # fmt: skip
    return parser


def _flags(argv: Sequence[str], problems: list[str], notices: list[str]) -> tuple[dict[str, Any], str | None]:
    args, extra = _argument_parser().parse_known_args(list(argv))
    for item in extra:
        if item.startswith("--"):
            flag = item.split("=", 1)[0]
            problems.append(_unknown(flag[2:].replace("-", "_"), flag))
        else:
            # Never echoed: it may be the value of a misspelt secret flag.
            problems.append("a value without a known --flag before it (every setting is a --flag)")
    parsed = vars(args)
    config_file = parsed.pop("config")
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        if value is None:
            continue
        if key.startswith("needless_"):
            _needless(key[9:], value, f"--{key[9:].replace('_', '-')}", problems, notices)
        elif BY_ATTR[key].kind in ("names", "patterns") and _empty(
            BY_ATTR[key], list(value), f"--{BY_ATTR[key].name}", problems
        ):
            continue
        elif BY_ATTR[key].kind == "patterns":
            out[key] = list(value)  # one flag, one rule
        elif BY_ATTR[key].kind == "names":
            out[key] = [part for item in value for part in item.split(",")]
        else:
            out[key] = value
    return out, config_file


def _json_or_text(text: str) -> Any:
    """A JSON array as its list (an empty one is empty), anything else as the text."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text  # _env_list names the problem
        return items if isinstance(items, list) else text
    return text if text.strip() else ""


def _env_list(opt: Option, text: str, shown: str) -> Any:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{shown}: not a JSON array ({exc.msg})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{shown}: expected a JSON array of strings")
        return items
    if opt.kind == "names":
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        raise ConfigError(
            f"{shown}: a regex is never split at commas; write one rule per line or a JSON array, "
            f'e.g. {shown}=\'["GET=^/a/[a-z]{{1,3}}$", "^/b/"]\''
        )
    return lines


def service_link(key: str, value: str) -> bool:
    """A variable Kubernetes made for a Service (see ``_SERVICE_LINK``): its name and its value fit."""
    for name, fits in _SERVICE_LINK:
        found = name.fullmatch(key)
        if found is not None and fits(found, value):
            return True
    return False


def _environment(environ: Mapping[str, str], problems: list[str], notices: list[str]) -> dict[str, Any]:
    """``SIDECAR_*`` beats ``OAUTH2_PROXY_*`` for the same option; unknown names are refused, except
    Kubernetes service links (ignored with one notice)."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}  # option -> the prefix that set it
    links: list[str] = []
    for prefix in reversed(ENV_PREFIXES):  # the later prefix (SIDECAR_) wins
        for key, text in environ.items():
            if not key.startswith(prefix) or key in _ENV_NOT_OPTIONS:
                continue
            name = key[len(prefix) :].lower()
            if name in NEEDLESS:
                _needless(name, text, key, problems, notices)
                continue
            opt = _NAMES.get(name)
            if opt is None and service_link(key, text):
                links.append(key)
                continue
            if opt is None:
                problems.append(_unknown(name, key))
                continue
            if opt.attr in seen and seen[opt.attr] != prefix:
                pass  # the same option under both prefixes: SIDECAR_ wins, as documented
            elif opt.attr in out:
                problems.append(f"{key}: {opt.name} is already set by another spelling; set it once")
                continue
            seen[opt.attr] = prefix
            if opt.kind in ("names", "patterns") and _empty(opt, _json_or_text(text), key, problems):
                continue
            try:
                out[opt.attr] = _env_list(opt, text, key) if opt.kind in ("names", "patterns") else text
            except ConfigError as exc:
                problems.append(str(exc))
    if links:
        notices.append(
            f"{', '.join(sorted(links))}: Kubernetes service links (a Service named like the prefix), not "
            "settings; ignored (enableServiceLinks: false in the pod spec removes them)"
        )
    return out


def _toml(path: str, problems: list[str], notices: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path!r} is not valid TOML ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in NEEDLESS:
            _needless(name, value, f"{path}: {key}", problems, notices)
            continue
        opt = _NAMES.get(name)
        if opt is None:
            problems.append(_unknown(name, f"{path}: {key}"))
        elif opt.attr in out:
            problems.append(f"{path}: {key}: {opt.name} is already set by another spelling; set it once")
        elif isinstance(value, (dict, list)) and opt.kind not in ("names", "patterns"):
            problems.append(f"{path}: {key}: expected a single value")
        elif opt.kind in ("names", "patterns") and _empty(opt, value, f"{path}: {key}", problems):
            pass
        else:
            out[opt.attr] = [value] if opt.kind == "patterns" and isinstance(value, str) else value
    return out


def load_config(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, notices: list[str] | None = None
) -> Config:
    """Merge file < env < flags and build the Config; raises ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    notes = notices if notices is not None else []
    flags, config_file = _flags(argv, problems, notes)
    config_file = config_file or environ.get("SIDECAR_CONFIG") or environ.get("OAUTH2_PROXY_CONFIG")
    merged = _toml(config_file, problems, notes) if config_file else {}
    merged.update(_environment(environ, problems, notes))
    merged.update(flags)
    try:
        config = build_config(merged)
    except ConfigError as exc:
        problems.extend(str(exc).splitlines())
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))  # each problem once, in order
    return config


def config_or_exit(argv: Sequence[str], err: Callable[[str], object] | None = None) -> Config:
    """Build the Config or print each problem on one line and exit with code 2."""
    write = err or (lambda s: sys.stderr.write(s + "\n"))
    notices: list[str] = []
    try:
        config = load_config(argv, notices=notices)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            write(f"sidecar: error: {line}")
        raise SystemExit(2) from None
    for line in notices:
        write(f"sidecar: notice: {line}")
    return config
