"""One fetch at a time, with a memory of failures: what protects the provider's discovery document and key set
from a burst of callers (``oidc``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .errors import ProviderError

T = TypeVar("T")


class Flight(Generic[T]):
    """One fetch at a time: callers arriving while it runs share its result, and a failure is
    answered again without asking the provider for a while (``first`` seconds, doubling with each
    failure in a row up to ``most``). Without this, a hanging provider makes the k-th queued caller
    wait k timeouts, and a burst of callers a burst of fetches."""

    def __init__(self, first: float, most: float) -> None:
        self.first, self.most = first, most
        self.started_at: float | None = None  # monotonic start of the last attempt
        self.failures = 0  # finished attempts that failed in a row
        self._task: asyncio.Future[T] | None = None
        self._failure: tuple[ProviderError, float] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def seconds_since_start(self) -> float:
        return math.inf if self.started_at is None else time.monotonic() - self.started_at

    async def run(self, fetch: Callable[[], Awaitable[T]]) -> T:
        if self._task is None:
            if self._failure is not None and self._failure[1] > time.monotonic():
                raise again(self._failure[0])
            self.started_at = time.monotonic()
            self._task = asyncio.ensure_future(self._attempt(fetch))
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
        # shield: a caller that goes away must not cancel the fetch the others share
        return await asyncio.shield(self._task)

    async def _attempt(self, fetch: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await fetch()
        except ProviderError as exc:
            self.failures += 1
            self._failure = (exc, time.monotonic() + self.backoff())
            raise
        finally:
            self._task = None
        self.failures, self._failure = 0, None
        return result

    @property
    def failed(self) -> bool:
        """The last finished attempt failed."""
        return self.failures > 0

    def backoff(self) -> float:
        """How long the latest failure is answered again without a fetch."""
        return min(self.most, self.first * 2.0 ** max(self.failures - 1, 0))


def again(exc: ProviderError) -> ProviderError:
    """A fresh copy of a remembered failure (one exception object must not collect every caller's traceback)."""
    again = type(exc)(f"{exc} (failed moments ago; not asked again yet)", error_code=exc.error_code)
    return again
