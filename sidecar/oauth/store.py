"""The grant store beside the session store: the same Redis connection (and key prefix), or memory.

The store's promises are in ``store_contract.py``, its two implementations in ``store_memory.py`` and
``store_redis.py``; this module picks one and keeps the names importable from one place.
"""

from __future__ import annotations

from ..store import RedisStore, SessionStore
from .store_contract import GrantStore
from .store_memory import MemoryGrantStore
from .store_redis import RedisGrantStore

__all__ = ["GrantStore", "MemoryGrantStore", "RedisGrantStore", "grant_store_for"]


def grant_store_for(sessions_store: SessionStore) -> GrantStore:
    """The grant store beside the session store: the same Redis connection (and prefix), or memory."""
    if isinstance(sessions_store, RedisStore):
        return RedisGrantStore(sessions_store.client, sessions_store.prefix)
    return MemoryGrantStore()
