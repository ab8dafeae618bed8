"""Look at a page the way a reviewer and an assistive technology would: axe-core in Chromium, and screenshots.

``inspect(page, name)`` runs axe-core (npm, tests/e2e/browser, installed by ``make browser-deps``) in the
page as it is, in light and in dark colours, and fails on any serious or critical violation; it also checks
the skeleton every page shares (``lang``, viewport, one ``<main>``, a title) and that the text fits a 390 px
screen without sideways scrolling; and it writes screenshots at 1280 and 390 px to build/screenshots/.

axe is evaluated through the DevTools protocol, which the pages' Content-Security-Policy (no script at all)
does not govern: the policy stays on while the page is checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from playwright.async_api import Page

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "tests" / "e2e" / "browser" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = Path(os.environ.get("SIDECAR_SCREENSHOTS", ROOT / "build" / "screenshots"))
WIDTHS = (1280, 390)
BAD = ("serious", "critical")
_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ['violations']});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 3).map(n => n.html.slice(0, 200))}));
}"""
_source: str | None = None


def axe_source() -> str:
    global _source
    if _source is None:
        if not AXE.exists():
            raise RuntimeError(f"{AXE} missing: run `make browser-deps` (npm ci in tests/e2e/browser)")
        _source = AXE.read_text()
    return _source


async def violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not await page.evaluate("typeof axe !== 'undefined'"):
        await page.evaluate(axe_source())
    found: list[dict[str, Any]] = await page.evaluate(_RUN)
    return [v for v in found if v["impact"] in BAD]


async def skeleton_problems(page: Page) -> list[str]:
    problems = []
    if not await page.evaluate("document.documentElement.lang"):
        problems.append("no lang")
    viewport = await page.evaluate("document.querySelector('meta[name=viewport]')?.content || ''")
    if "width=device-width" not in viewport:
        problems.append("no viewport meta")
    if await page.locator("main").count() != 1:
        problems.append("not exactly one <main>")
    if not (await page.title()).strip():
        problems.append("no title")
    if await page.locator("h1").count() != 1:
        problems.append("not exactly one h1")
    return problems


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


async def inspect(page: Page, name: str) -> None:
    """axe (light and dark) + skeleton + 390 px fit + screenshots; raises AssertionError listing every problem."""
    problems = await skeleton_problems(page)
    size = page.viewport_size or {"width": 1280, "height": 900}
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        for scheme in ("light", "dark"):
            await page.emulate_media(color_scheme=scheme)
            for v in await violations(page):
                problems.append(f"{scheme}: axe {v['impact']} {v['id']}: {v['help']} {v['nodes']}")
        await page.emulate_media(color_scheme="light")
        for width in WIDTHS:
            await page.set_viewport_size({"width": width, "height": size["height"]})
            if width < 500:
                overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                if overflow > 0:
                    problems.append(f"{width} px: the page scrolls sideways by {overflow} px")
                text_px = await page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
                if text_px < 16:
                    problems.append(f"{width} px: body text {text_px} px")
            await page.screenshot(path=str(SHOTS / f"{_slug(name)}-{width}.png"), full_page=True)
    finally:
        await page.set_viewport_size(size)
    assert not problems, f"{name} ({page.url}):\n" + "\n".join(problems)
