"""The API's one JSON parser: what it accepts can be stored as it is, so bad input is a 400, never a 500.

PostgreSQL's ``jsonb`` and ``text`` refuse what Python's ``json`` accepts: NUL characters, lone UTF-16
surrogates (``"\\ud800"``) and non-finite numbers (``1e400`` parses as infinity). A body holding any of them
is refused here, before a view, the audit trail or an idempotency record could try to store it. So is a
body nested deeper than ``MAX_DEPTH`` (Python would recurse until it fails).
"""

from __future__ import annotations

import json
import math

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

MAX_DEPTH = 32


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"JSON parse error - the number {text[:40]} is out of range")
    return value


def _not_a_number(text: str):
    raise ParseError(f"JSON parse error - {text} is not a JSON number")


def _storable_text(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def body_check(data) -> None:
    """Raise ``ParseError`` unless every string of ``data`` can be stored and it is at most ``MAX_DEPTH``
    deep. Iterative: a deep body cannot exhaust the stack here."""
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            if not _storable_text(value):
                raise ParseError("JSON strings may not contain NUL characters or unpaired surrogates")
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ParseError(f"JSON nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, dict):
                pending.extend((key, depth) for key in value)
                pending.extend((item, depth + 1) for item in value.values())
            else:
                pending.extend((item, depth + 1) for item in value)


class GridJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            data = json.loads(
                stream.read().decode(encoding),
                parse_float=_finite_float,
                parse_constant=_not_a_number,
            )
        except RecursionError:
            raise ParseError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
        except ParseError:
            raise
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ParseError(f"JSON parse error - {exc}") from None
        body_check(data)
        return data
