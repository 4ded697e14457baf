"""JSON from untrusted bytes with a nesting limit checked before parsing.

`json.loads` recurses once per level: a body nested a few thousand levels deep raises
RecursionError (not ValueError) and, caught by nobody, answers 500 or kills a consumer. The
depth is measured first by a scan over the brackets outside strings, so nothing deeper than
the limit ever reaches the recursive parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: deeper than any valid ClientChange (about 5) or Celery message body (about 8)
MAX_DEPTH = 32

# A JSON string (with escapes), or one bracket: strings are skipped so "[[[" inside one is not nesting.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


class JsonError(ValueError):
    """Not acceptable JSON; the message says why (and names the limit when it is the depth)."""


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in `raw` (unbalanced input is left to the parser)."""
    level = deepest = 0
    for m in _TOKENS.finditer(raw):
        tok = m.group()
        if tok in (b"[", b"{"):
            level += 1
            deepest = max(deepest, level)
        elif tok in (b"]", b"}"):
            level -= 1
    return deepest


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `raw`, refusing nesting deeper than `max_depth`; raises `JsonError`, nothing else."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if depth(data) > max_depth:
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise JsonError("not valid JSON") from exc
