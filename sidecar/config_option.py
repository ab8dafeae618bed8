"""How one option is declared, read and shown: the field helper, the Go-style duration and boolean
parsers, and the ``Option`` view the loaders use.

Kept apart from ``config.py`` so the list of settings there reads as a list, and so the loaders
(``config_load.py``) and the checks (``config_checks.py``) share one reading of every value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

Seconds = float
Names = tuple[str, ...]
Patterns = tuple[str, ...]

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"30m"``, ``"168h"`` or ``"1h30m"`` (Go style, as oauth2-proxy)."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):  # ASCII digits only: Python's \d and float() take any script
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use seconds or units like 30m, 168h)")
    return total


def parse_int(text: str) -> int:
    """A whole number in ASCII digits: Python's ``int`` also takes ``1_000`` and digits of any script."""
    if not re.fullmatch(r"-?[0-9]+", text.strip()):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text.strip())


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on", "t"):
        return True
    if lowered in ("0", "false", "no", "off", "f"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false/1/0)")


def option(
    default: Any,
    help: str,  # noqa: A002 - the --help text
    *,
    secret: bool = False,
    aliases: tuple[str, ...] = (),
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A settings field; ``aliases`` are other accepted names (oauth2-proxy's plural spellings)."""
    meta = {"help": help, "secret": secret, "aliases": aliases, "low": low, "high": high, "choices": choices}
    return field(default=default, metadata=meta)


def derived_field(default: Any) -> Any:
    """A field computed by ``build_config`` from the options: not an option, not in ``repr``."""
    return field(default=default, repr=False, compare=False)


@dataclass(frozen=True)
class Option:
    """One option as the loaders see it, read off a ``Config`` field."""

    attr: str
    kind: str  # str | bool | int | duration | names | patterns
    default: Any
    help: str
    secret: bool
    aliases: tuple[str, ...]
    low: float | None
    high: float | None
    choices: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "SIDECAR_" + self.attr.upper()

    def shown(self, value: Any) -> Any:
        """The value as it may appear in a log line: secrets hidden, passwords cut out of URLs."""
        if not self.secret or not value:
            return value
        if self.attr.startswith("redis_") and "url" in self.attr:
            return tuple(mask_url(v) for v in value) if isinstance(value, tuple) else mask_url(value)
        return "<hidden>"

    def convert(self, raw: Any) -> Any:
        """A raw flag, env or TOML value (or an already converted one) as this option's type."""
        if self.kind in ("names", "patterns"):
            items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            if not all(isinstance(item, str) for item in items):
                raise ValueError("expected text or a list of text")
            if self.kind == "names" and not isinstance(raw, (list, tuple)):
                items = items[0].split(",")
            return tuple(item.strip() for item in items if item.strip())
        if self.kind == "bool":
            return raw if isinstance(raw, bool) else parse_bool(str(raw))
        if self.kind == "int":
            value = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_int(str(raw))
            return self._bounded(value)
        if self.kind == "duration":
            if isinstance(raw, bool):
                raise ValueError(f"not a duration: {raw!r}")
            if isinstance(raw, (int, float)):
                return float(self._bounded(raw))
            return self._bounded(parse_duration(str(raw)))
        if not isinstance(raw, str):
            raise ValueError(f"expected text, got {type(raw).__name__}")
        if self.choices and raw.strip().lower() not in self.choices:
            shown = ", ".join(repr(c) for c in self.choices)
            raise ValueError(f"must be one of {shown}, got {raw!r}")
        return raw.strip().lower() if self.choices else raw

    def _bounded(self, value: float) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        low = 0.0 if self.low is None else self.low
        huge = isinstance(value, int) and abs(value) > 2**53  # a TOML integer has no size limit: never float() it
        if huge or value < low or (self.high is not None and value > self.high):
            high = "" if self.high is None else f" and at most {self.high:g}"
            got = f"a {int(value).bit_length()}-bit number" if huge else f"{value:g}"
            raise ValueError(f"must be at least {low:g}{high}, got {got}")
        return value


_KINDS = {"str": "str", "bool": "bool", "int": "int", "Seconds": "duration", "Names": "names", "Patterns": "patterns"}


def options_of(cls: type[Any]) -> tuple[Option, ...]:
    """The options of a settings dataclass: its fields made with ``option``."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            m = f.metadata
            out.append(
                Option(
                    f.name,
                    _KINDS[str(f.type)],
                    f.default,
                    m["help"],
                    m["secret"],
                    m["aliases"],
                    m["low"],
                    m["high"],
                    m["choices"],
                )  # fmt: skip
            )
    return tuple(out)


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: passwords never reach a log or error."""
    try:
        parts = urlsplit(url if "//" in url else "redis://" + url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
