"""The HTML pages the sidecar shows (sign-in, errors), with the operator's branding.

Each page is a ``string.Template`` with ``$placeholders``. Built-in templates are used unless
``--custom-templates-dir`` holds ``sign_in.html`` and/or ``error.html``; those are read and
checked once at start-up, so a typo in a placeholder or an unreadable file stops the sidecar
instead of breaking the page for the first user who needs it. ``--banner`` and ``--footer`` are
plain text: they are HTML-escaped like every other value, so no operator text (and no request
text) can inject markup. Only values wrapped in ``Html`` (built by the sidecar itself) go in as
they are.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from string import Template

from . import kit
from .errors import ConfigError


class Html(str):
    """Markup the sidecar built itself from escaped parts: inserted without escaping."""

    __slots__ = ()


# name -> (placeholders a template may use, placeholders it must use)
PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "sign_in": (frozenset({"title", "banner", "footer", "sign_in_url", "redirect"}), frozenset({"sign_in_url"})),
    "error": (frozenset({"title", "status", "message", "actions", "banner", "footer"}), frozenset({"message"})),
}

# The built-in pages are made by the page kit (``kit.document``); these bodies are filled with escaped values.
_BUILT_IN_BODIES = {
    "sign_in": Template(
        "<p>This application is protected. Sign in with your organisation's account to continue.</p>"
        "<p><a class='button' href='$sign_in_url'>Sign in</a></p><p class='muted'>You will return to $redirect</p>"
    ),
    "error": Template("<p>$message</p>$actions"),
}


@dataclass(frozen=True)
class PageTemplates:
    """The checked templates plus the escaped banner and footer, rendered by ``render``."""

    templates: dict[str, Template] = field(default_factory=dict)
    banner: str = ""
    footer: str = ""

    def render(self, name: str, **values: str) -> str:
        """The page ``name`` with ``values`` (plain text is escaped; ``Html`` is not). Placeholders a
        caller leaves out render empty, so a page never fails to show."""
        allowed, _ = PLACEHOLDERS[name]
        filled = {key: "" for key in allowed}
        filled["banner"] = _wrap(self.banner, "banner")
        filled["footer"] = _wrap(self.footer, "footer")
        for key, value in values.items():
            if key not in allowed:
                raise KeyError(f"template {name!r} has no placeholder {key!r}")
            filled[key] = value if isinstance(value, Html) else html.escape(str(value), quote=True)
        custom = self.templates.get(name)
        if custom is not None:
            return custom.substitute(filled)
        title = str(values.get("title", "")) or ("Sign in" if name == "sign_in" else "Error")
        body = _BUILT_IN_BODIES[name].substitute(filled)
        return kit.document(title, body, self.banner, self.footer, error=name == "error")

    def built_in(self, name: str) -> bool:
        """The page comes from the kit (and may carry the kit's strict Content-Security-Policy)."""
        return name not in self.templates


def _wrap(text: str, css_class: str) -> str:
    return f"<div class='{css_class}'>{html.escape(text, quote=True)}</div>" if text else ""


def _check(name: str, path: str, template: Template) -> None:
    allowed, required = PLACEHOLDERS[name]
    if not template.is_valid():
        raise ConfigError(f"--custom-templates-dir: {path}: a '$' that is not a placeholder (write $$ for a dollar)")
    used = set(template.get_identifiers())
    unknown = sorted(used - allowed)
    if unknown:
        known = ", ".join("$" + k for k in sorted(allowed))
        raise ConfigError(f"--custom-templates-dir: {path}: unknown placeholder ${unknown[0]} (known: {known})")
    missing = sorted(required - used)
    if missing:
        raise ConfigError(f"--custom-templates-dir: {path}: the page needs ${missing[0]}")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise ConfigError(f"--custom-templates-dir: {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"--custom-templates-dir: {path}: cannot read it ({exc.strerror})") from None


def load_templates(directory: str, banner: str, footer: str) -> PageTemplates:
    """Read and check the operator's templates; raises ConfigError naming the file and the problem."""
    loaded: dict[str, Template] = {}
    if directory:
        if not os.path.isdir(directory):
            raise ConfigError(f"--custom-templates-dir: {directory!r} is not a readable directory")
        for name in PLACEHOLDERS:
            path = os.path.join(directory, f"{name}.html")
            if os.path.exists(path):
                template = Template(_read(path))
                _check(name, path, template)
                loaded[name] = template
        if not loaded:
            names = " or ".join(f"{n}.html" for n in PLACEHOLDERS)
            raise ConfigError(f"--custom-templates-dir: {directory!r} holds neither {names}")
    return PageTemplates(loaded, banner, footer)


DEFAULT_TEMPLATES = PageTemplates()
