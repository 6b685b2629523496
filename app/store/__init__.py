"""Stores behind one interface (`Store`): memory, SQLite (default), Redis."""

from __future__ import annotations

import os

from app.store.base import Frame, MemoryStore, Store, StoreError


def open_store(url: str, instance_path: str) -> Store:
    """The store named by `STORE_URL`: "", `sqlite:///path`, `memory://` or `redis://…`."""
    if not url:
        return _sqlite(os.path.join(instance_path, "relay.sqlite3"))
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        return _sqlite(url.removeprefix("sqlite://"))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from app.store.redis import RedisStore

        return RedisStore(url)
    scheme = url.partition("://")[0] if "://" in url else url[:20]
    raise ValueError(f"STORE_URL starts with {scheme!r}: expected sqlite:///path, redis://host:port/db or memory://")


def _sqlite(path: str) -> Store:
    from app.store.sqlite import SqliteStore

    return SqliteStore(path)


__all__ = ["Frame", "MemoryStore", "Store", "StoreError", "open_store"]
