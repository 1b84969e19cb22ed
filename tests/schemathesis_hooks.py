"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS by the
schemathesis CLI, never by pytest): generated bodies keep their fields but ask for at most
MAX_TOKENS tokens, since fuzzing checks shapes, not long generations."""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    """Cap ``max_tokens``, ``max_completion_tokens``, ``min_tokens`` and ``max_output_tokens``
    where they are ints above MAX_TOKENS (an invalid value stays invalid); give chat and
    Responses bodies without a cap one.
    Runs before every request of every phase (``map_body`` misses the coverage phase)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens"):
        value = body.get(field)
        if type(value) is int and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if isinstance(body.get("messages"), list) and "max_tokens" not in body and \
            "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    if "input" in body and "max_output_tokens" not in body:  # a Responses body
        body["max_output_tokens"] = MAX_TOKENS
