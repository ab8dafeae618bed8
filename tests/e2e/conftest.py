"""Fixtures shared by the end-to-end tests: one real Chromium for the whole run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from playwright.async_api import Browser

from tests.e2e.chromium import chromium


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def chromium_browser() -> AsyncIterator[Browser]:
    """One headless Chromium (fresh profile) for every browser test; each test opens its own context
    (``new_page``) so cookies never leak between tests. Tests using it run on the session loop."""
    async with chromium() as browser:
        yield browser
