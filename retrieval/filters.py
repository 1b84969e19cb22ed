"""OpenAI's attribute filters for vector store search and ``file_search``: a comparison
(``{"type": "eq", "key": "year", "value": 2024}``; ``eq ne gt gte lt lte in nin``) or a compound
(``{"type": "and" | "or", "filters": [...]}``) over a file's ``attributes`` (strings, numbers,
booleans).

A filter is checked once (:func:`check`, a ``FilterError`` naming the bad part) and then applied
to each document's attributes (:func:`matches`). A comparison on a key the file does not have is
false (``ne`` and ``nin`` included: the file has no value to differ); ordering comparisons
between a number and a string are false rather than an error, as mixed attribute types across
files are normal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
COMPOUNDS = ("and", "or")
MAX_DEPTH = 8
MAX_NODES = 256

Scalar = str | int | float | bool


class FilterError(ValueError):
    """The filter is not a valid comparison or compound filter."""


def check(f: Any, _depth: int = 0, _count: list[int] | None = None) -> None:
    """Raise ``FilterError`` unless ``f`` is a well-formed filter (at most ``MAX_DEPTH`` deep
    and ``MAX_NODES`` comparisons and compounds in all)."""
    count = _count if _count is not None else [0]
    count[0] += 1
    if count[0] > MAX_NODES:
        raise FilterError(f"a filter may hold at most {MAX_NODES} comparisons and compounds")
    if _depth > MAX_DEPTH:
        raise FilterError(f"filters may nest at most {MAX_DEPTH} deep")
    if not isinstance(f, Mapping):
        raise FilterError(f"a filter is an object, got {type(f).__name__}")
    kind = f.get("type")
    if kind in COMPOUNDS:
        extra = set(f) - {"type", "filters"}
        if extra:
            raise FilterError(f"a compound filter has 'type' and 'filters', not {sorted(extra)}")
        subs = f.get("filters")
        if not isinstance(subs, list) or not subs:
            raise FilterError(f"an {kind!r} filter needs a non-empty 'filters' list")
        for sub in subs:
            check(sub, _depth + 1, count)
        return
    if kind not in COMPARISONS:
        raise FilterError(f"filter type must be one of {', '.join(COMPARISONS + COMPOUNDS)}, "
                          f"got {kind!r}")
    extra = set(f) - {"type", "key", "value"}
    if extra:
        raise FilterError(f"a comparison filter has 'type', 'key' and 'value', not "
                          f"{sorted(extra)}")
    if not isinstance(f.get("key"), str) or not f["key"]:
        raise FilterError("a comparison filter needs a 'key' (a non-empty string)")
    value = f.get("value")
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not all(_scalar(v) for v in value):
            raise FilterError(f"{kind!r} compares with a list of strings, numbers or booleans")
    elif not _scalar(value):
        raise FilterError(f"{kind!r} compares with a string, number or boolean, got "
                          f"{type(value).__name__}")


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool) and v == v  # no NaN


def matches(f: Mapping[str, Any], attributes: Mapping[str, Scalar]) -> bool:
    """Does a file with ``attributes`` pass the (checked) filter ``f``?

    >>> year = {"type": "gte", "key": "year", "value": 2020}
    >>> lang = {"type": "in", "key": "lang", "value": ["en", "fr"]}
    >>> matches({"type": "and", "filters": [year, lang]}, {"year": 2024, "lang": "fr"})
    True
    >>> matches({"type": "ne", "key": "lang", "value": "en"}, {})
    False
    """
    kind = f["type"]
    if kind == "and":
        return all(matches(sub, attributes) for sub in f["filters"])
    if kind == "or":
        return any(matches(sub, attributes) for sub in f["filters"])
    if f["key"] not in attributes:
        return False
    have, want = attributes[f["key"]], f["value"]
    if kind == "eq":
        return _same(have, want)
    if kind == "ne":
        return not _same(have, want)
    if kind == "in":
        return any(_same(have, w) for w in want)
    if kind == "nin":
        return not any(_same(have, w) for w in want)
    if isinstance(have, bool) or isinstance(want, bool):
        return False
    if isinstance(have, str) != isinstance(want, str):
        return False
    if kind == "gt":
        return have > want  # type: ignore[operator]
    if kind == "gte":
        return have >= want  # type: ignore[operator]
    if kind == "lt":
        return have < want  # type: ignore[operator]
    return have <= want  # type: ignore[operator]


def _same(a: Scalar, b: Scalar) -> bool:
    """Equal with booleans apart from numbers (``True`` is not ``1`` in an attribute)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b
