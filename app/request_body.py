"""Reading JSON that clients send: one object, bounded depth, text that is valid Unicode.

Every way in (HTTP bodies, the WebSocket's first message) reads client JSON here, so
no transport can hand the rest of the app a value that recurses past the interpreter's
limit or a lone surrogate ("\\ud800") that would be stored and then fail every later
read of the conversation when encoded as UTF-8.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.errors import ApiError
from app.json_depth import MAX_DEPTH

_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json_object(raw: bytes | str, what: str = "the request body") -> dict[str, Any]:
    """`raw` as a JSON object, or an `ApiError` 400 that says what is wrong with it."""
    data = parse_json(raw, what)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", f"{what} must be a JSON object")
    return data


def parse_json(raw: bytes | str, what: str) -> Any:
    """`raw` as any JSON value (a query parameter's list, a body's object), with the same bounds
    as a body: depth, valid Unicode; an `ApiError` 400 otherwise."""
    if not raw.strip():
        raise ApiError(400, "invalid_request", f"{what} must be JSON")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "invalid_json", f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON") from None
    check_untrusted(data, what)
    return data


def check_untrusted(value: Any, what: str = "the request body") -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with unpaired surrogates (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise ApiError(400, "invalid_request", f"{what} has text with an unpaired UTF-16 surrogate")
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ApiError(400, "invalid_json", f"{what} nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
