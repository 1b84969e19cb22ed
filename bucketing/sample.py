"""A bounded, uniform sample of the lengths a server has seen, for planning bucket lists.

Two integer streams are sampled, each with Vitter's algorithm R (a fixed-seed RNG, so a replay
gives the same sample):

- prompt lengths: what a prefill (context-encoding) bucket must hold;
- decode context lengths: prompt plus generated tokens when the request ends, the longest
  context a token-generation bucket must hold for that request.

Each observation costs O(1) and keeps two integers at most; no text is stored.

>>> s = LengthSample(capacity=3)
>>> for n in (10, 20, 30, 40):
...     s.observe(n, 5)
>>> s.seen, len(s.prompt_lengths), len(s.context_lengths)
((4, 4), 3, 3)
>>> LengthSample.from_json(s.to_json()).to_json() == s.to_json()
True
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_CAPACITY = 10_000

#: accepted JSONL keys: (prompt length, decode context length)
KEYS = (("prompt_tokens", "total_tokens"), ("prompt", "context"))


class SampleError(ValueError):
    """A file or JSON object that does not describe a length sample; the message says why."""


class _Reservoir:
    """Algorithm R over one integer stream (not thread-safe: :class:`LengthSample` locks)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.items: list[int] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, n: int) -> None:
        if self.seen < self.capacity:
            self.items.append(n)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.capacity:
                self.items[j] = n
        self.seen += 1


class LengthSample:
    """Uniform samples of at most ``capacity`` prompt lengths and decode context lengths.

    Thread-safe: the server records from its event loop while a route reads a copy.

    >>> s = LengthSample()
    >>> s.observe(100, 20)
    >>> s.add(context=300)
    >>> s.prompt_lengths, s.context_lengths
    ([100], [120, 300])
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self._prompt = _Reservoir(capacity, seed)
        self._context = _Reservoir(capacity, seed + 1)
        self._lock = threading.Lock()

    def observe(self, prompt_tokens: int, generated_tokens: int) -> None:
        """One finished request: its prompt length and how many tokens it generated."""
        self.add(prompt_tokens, prompt_tokens + generated_tokens)

    def add(self, prompt: int | None = None, context: int | None = None) -> None:
        """A prompt length and/or a decode context length (either may be missing)."""
        for name, n in (("prompt", prompt), ("context", context)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"{name} length must be an integer >= 1, got {n!r}")
        with self._lock:
            if prompt is not None:
                self._prompt.add(prompt)
            if context is not None:
                self._context.add(context)

    @property
    def prompt_lengths(self) -> list[int]:
        """A copy of the sampled prompt lengths (in reservoir order)."""
        with self._lock:
            return list(self._prompt.items)

    @property
    def context_lengths(self) -> list[int]:
        """A copy of the sampled decode context lengths (in reservoir order)."""
        with self._lock:
            return list(self._context.items)

    @property
    def seen(self) -> tuple[int, int]:
        """How many prompt and context lengths were observed (not only kept)."""
        with self._lock:
            return self._prompt.seen, self._context.seen

    def __len__(self) -> int:
        with self._lock:
            return max(len(self._prompt.items), len(self._context.items))

    def to_json(self) -> dict[str, Any]:
        """The sample as a JSON-ready object (what :meth:`from_json` reads back)."""
        with self._lock:
            return {"capacity": self.capacity,
                    "seen": {"prompt": self._prompt.seen, "context": self._context.seen},
                    "prompt_lengths": list(self._prompt.items),
                    "context_lengths": list(self._context.items)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LengthSample:
        """A sample from :meth:`to_json`'s object, or any object with ``prompt_lengths`` and/or
        ``context_lengths`` lists (a saved ``GET /v1/buckets`` body is one).

        >>> LengthSample.from_json({"prompt_lengths": [5, 7]}).prompt_lengths
        [5, 7]
        >>> LengthSample.from_json({"prompt_lengths": "x"})
        Traceback (most recent call last):
        ...
        bucketing.sample.SampleError: prompt_lengths must be a list of integers >= 1
        """
        if not isinstance(obj, dict):
            raise SampleError("expected a JSON object")
        lists = {}
        for key in ("prompt_lengths", "context_lengths"):
            values = obj.get(key) or []
            if not isinstance(values, list) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in values):
                raise SampleError(f"{key} must be a list of integers >= 1")
            lists[key] = values
        if "prompt_lengths" not in obj and "context_lengths" not in obj:
            raise SampleError("no prompt_lengths or context_lengths in the object")
        capacity = obj.get("capacity")
        if not isinstance(capacity, int) or capacity < 1:
            capacity = max(DEFAULT_CAPACITY, *map(len, lists.values()))
        seen = obj.get("seen") if isinstance(obj.get("seen"), dict) else {}
        s = cls(capacity)
        with s._lock:
            for r, key, name in ((s._prompt, "prompt_lengths", "prompt"),
                                 (s._context, "context_lengths", "context")):
                r.items = list(lists[key][:capacity])
                n = seen.get(name)
                r.seen = n if isinstance(n, int) and n >= len(r.items) else len(r.items)
        return s

    @classmethod
    def from_jsonl(cls, lines: Iterable[str], source: str = "<lines>",
                   capacity: int = DEFAULT_CAPACITY) -> LengthSample:
        """A sample from JSON lines ``{"prompt_tokens": int, "total_tokens": int}`` (an OpenAI
        ``usage`` object fits) or ``{"prompt": int, "context": int}``; blank lines are skipped.

        >>> s = LengthSample.from_jsonl(['{"prompt_tokens": 9, "total_tokens": 20}', '',
        ...                              '{"prompt": 4, "context": 6}'])
        >>> s.prompt_lengths, s.context_lengths
        ([9, 4], [20, 6])
        >>> LengthSample.from_jsonl(['{"prompt": 0}'], "t.jsonl")
        Traceback (most recent call last):
        ...
        bucketing.sample.SampleError: t.jsonl:1: prompt length must be an integer >= 1, got 0
        """
        s = cls(capacity)
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SampleError(f"{source}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SampleError(f"{source}:{i}: expected a JSON object")
            for p_key, c_key in KEYS:
                if p_key in obj or c_key in obj:
                    try:
                        s.add(obj.get(p_key), obj.get(c_key))
                    except ValueError as e:
                        raise SampleError(f"{source}:{i}: {e}") from None
                    break
            else:
                raise SampleError(f"{source}:{i}: expected prompt_tokens/total_tokens or "
                                  "prompt/context")
        return s

    @classmethod
    def read(cls, path: str | Path) -> LengthSample:
        """A sample from a file: a JSON object (:meth:`from_json`, e.g. a saved
        ``GET /v1/buckets`` body) or JSON lines (:meth:`from_jsonl`)."""
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read {path}: {e}") from None
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines (or not JSON at all: from_jsonl says where)
        if isinstance(whole, dict) and ("prompt_lengths" in whole or "context_lengths" in whole):
            return cls.from_json(whole)
        return cls.from_jsonl(text.splitlines(), str(path))
