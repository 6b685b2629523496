"""The operating system's own primitives when gevent has monkey-patched the standard library.

Under gunicorn's gevent worker, `threading.Lock` and `select.poll` are cooperative
versions. A few places need the real ones: a sleep on one of gevent's native threads (a
SQLite write waiting there for another process), and a zero-timeout poll that must never
yield to the event loop. Elsewhere (mod_wsgi, werkzeug) these are the standard library's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

try:
    from gevent import get_hub
    from gevent.monkey import get_original, is_module_patched
except ImportError:  # gevent is optional outside gunicorn
    get_hub = get_original = is_module_patched = None


def unpatched(module: str, name: str) -> Any:
    """`module.name` as the standard library defines it, even after gevent's patching."""
    if is_module_patched is not None and is_module_patched(module):
        return get_original(module, name)
    return getattr(importlib.import_module(module), name)


def gevent_threadpool() -> Callable[[], Any] | None:
    """A getter for the current hub's native thread pool when threading is patched, else None."""
    if is_module_patched is not None and is_module_patched("threading"):
        return lambda: get_hub().threadpool
    return None


# The OS's poll even under gevent: a zero-timeout poll never yields to the event loop, and
# unlike select() it works for descriptors above FD_SETSIZE (1024).
native_poll = unpatched("select", "poll")
