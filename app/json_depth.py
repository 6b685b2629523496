"""How deep JSON nests, and how deep the relay lets it: one limit for request bodies, tool-call
arguments (from clients, and from models when they are sent on) and anything else parsed
from untrusted text, so no parser recurses without bound. No imports from the app: both the
request readers and the provider adapters use it.
"""

from __future__ import annotations

import re

# Chat payloads nest 4 deep, tool schemas a few levels more; nothing legitimate nears this.
MAX_DEPTH = 64
# What changes the nesting as JSON is read: quotes, escapes (inside strings) and brackets.
_NESTING_TOKENS = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def json_nesting(text: str) -> int:
    """How deep `text` nests JSON arrays and objects, read without parsing it (linear, no
    recursion), lexed as a JSON parser lexes it: brackets inside strings are text. Valid JSON
    is not required (tool-call arguments are a model's text, and clients send them back as
    they came); on any valid prefix the count is the one a parser would reach."""
    depth = deepest = 0
    in_string = False
    for token in _NESTING_TOKENS.findall(text):  # one pass: a regex over strings backtracks
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest
