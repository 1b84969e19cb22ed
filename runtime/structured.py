"""Structured outputs: a request's constraint (``scheduler.StructuredOutput``) compiled into a
grammar, and a matcher per request that masks each step's logits to the tokens it allows.

The grammar library is xgrammar. ``benchmarks/grammar_libs.py`` measured the three on PyPI on
ragserve's tokenizers (BENCHMARKS.md): xgrammar compiles a 20-property schema in 10-45 ms and
fills a token mask in ~1 us (tail ~0.1 ms); llguidance compiles in ~1 ms but fills a mask in
~10 us (tail over 1 ms), outlines-core compiles in 0.5-5.6 s. The mask is paid on every
constrained row of every step, the compile once per schema (cached), so xgrammar. It is also
vLLM's default backend, so ``--engine vllm`` constrains with the same library.

Everything that can be refused is refused at compile time (the server compiles each new spec
once, off its event loop, before queueing: a 400), including the JSON-schema keywords xgrammar
would silently ignore (:func:`unsupported_schema_feature`): a constraint is enforced in full
or refused, never relaxed.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from scheduler import StructuredKind, StructuredOutput

#: bytes of spec text (a schema, regex, grammar or choice list) accepted per request
MAX_SPEC_BYTES = 256 * 1024
#: compiled grammars kept per compiler (least recently used go first)
CACHE_ENTRIES = 512

#: ``format`` values xgrammar enforces on strings (its json_schema_converter)
STRING_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
    "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
#: keywords that constrain nothing: titles, docs, examples, schema ids
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "$anchor", "strict", "discriminator",
})
#: keywords xgrammar enforces (subject to the combinations checked below)
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minProperties", "maxProperties", "unevaluatedProperties", "unevaluatedItems",
    "propertyNames", "patternProperties",
})


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled or enforced; the message names what and where."""


def _types(schema: dict[str, Any]) -> set[str]:
    t = schema.get("type")
    return {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(
        t, list) else set()


def unsupported_schema_feature(schema: Any, path: str = "#") -> str | None:
    """The first keyword in ``schema`` that xgrammar would not enforce, as ``"keyword at
    path"``, or None. Unknown keywords count as unsupported: a schema is enforced in full.

    >>> unsupported_schema_feature({"type": "object", "properties": {"n": {"type": "integer",
    ...     "multipleOf": 3}}})
    "'multipleOf' at #/properties/n"
    >>> unsupported_schema_feature({"type": "string", "title": "x", "maxLength": 3}) is None
    True
    """
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"a schema that is not an object at {path}"
    types = _types(schema)
    for key in schema:
        if key not in ENFORCED and key not in ANNOTATIONS:
            return f"{key!r} at {path}"
    if "format" in schema and schema["format"] not in STRING_FORMATS:
        return f"'format': {schema['format']!r} at {path}"
    if ("pattern" in schema or "format" in schema) and (
            "minLength" in schema or "maxLength" in schema):
        return f"'pattern' or 'format' together with 'minLength'/'maxLength' at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with more than one branch at {path}"
    if "object" in types or "properties" in schema:
        if "propertyNames" in schema and ("properties" in schema
                                          or "patternProperties" in schema):
            return f"'propertyNames' together with 'properties' at {path}"
        if "patternProperties" in schema and ("properties" in schema
                                              or len(schema["patternProperties"]) > 1):
            return f"'patternProperties' together with 'properties' at {path}"
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        for name, sub in (schema.get(key) or {}).items():
            found = unsupported_schema_feature(sub, f"{path}/{key}/{name}")
            if found:
                return found
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            found = unsupported_schema_feature(sub, f"{path}/{key}/{i}")
            if found:
                return found
    for key in ("items", "additionalProperties", "propertyNames", "unevaluatedProperties",
                "unevaluatedItems"):
        if isinstance(schema.get(key), dict):
            found = unsupported_schema_feature(schema[key], f"{path}/{key}")
            if found:
                return found
    return None


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices`` (vLLM's ``choice``)."""
    def literal(s: str) -> str:
        # json.dumps escapes quotes, backslashes and control characters as EBNF wants them
        return json.dumps(s, ensure_ascii=False)
    return "root ::= " + " | ".join(literal(c) for c in choices)


def parse_choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(f"choice is not a JSON list: {e}") from None
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise StructuredOutputError("choice must be a non-empty list of non-empty strings")
    return choices


class GrammarCompiler:
    """Compiles constraints for one tokenizer; the compiled grammars are cached (LRU by kind
    and spec). Thread-safe: the server compiles on worker threads, the engine on its own."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_entries: int = CACHE_ENTRIES) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_entries = cache_entries
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None

    def _xgr(self) -> Any:
        """xgrammar's compiler, built on first use: its tokenizer table takes 0.2-0.7 s."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size,
                    stop_token_ids=self.stop_token_ids)
                # xgrammar's own cache is off: ours is keyed by the request's text and bounded
                # by entries, xgrammar's by bytes of its own normalized keys.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def warm(self) -> None:
        self._xgr()

    def compile(self, so: StructuredOutput) -> Any:
        """The compiled grammar for ``so``; raises :class:`StructuredOutputError`."""
        key = (so.kind.value, so.spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(so)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, so: StructuredOutput) -> bool:
        with self._lock:
            return (so.kind.value, so.spec) in self._cache

    def _compile(self, so: StructuredOutput) -> Any:
        size = len(so.spec.encode())
        if size > MAX_SPEC_BYTES:
            raise StructuredOutputError(f"the {so.kind.value} constraint is {size} bytes; the "
                                        f"limit is {MAX_SPEC_BYTES}")
        compiler = self._xgr()
        try:
            if so.kind is StructuredKind.JSON:
                try:
                    schema = json.loads(so.spec)
                except json.JSONDecodeError as e:
                    raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
                found = unsupported_schema_feature(schema)
                if found:
                    raise StructuredOutputError(f"the JSON schema uses {found}, which ragserve "
                                                "cannot enforce")
                # No free whitespace: small models given the choice fill max_tokens with it.
                return compiler.compile_json_schema(so.spec, any_whitespace=False,
                                                    strict_mode=True)
            if so.kind is StructuredKind.JSON_OBJECT:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if so.kind is StructuredKind.REGEX:
                return compiler.compile_regex(so.spec)
            if so.kind is StructuredKind.CHOICE:
                return compiler.compile_grammar(choice_grammar(parse_choices(so.spec)))
            return compiler.compile_grammar(so.spec)
        except StructuredOutputError:
            raise
        except (RuntimeError, ValueError) as e:  # xgrammar's parse and conversion errors
            text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            # xgrammar prefixes its C++ source location: "[12:00:00] /project/...cc:42: msg"
            text = text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
            raise StructuredOutputError(f"the {so.kind.value} constraint cannot be compiled: "
                                        f"{text}") from None


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self._m.is_terminated():  # only a stop token is left: EOS
            bitmask[row].zero_()
            for t in self._m.stop_token_ids:
                bitmask[row, t // 32] |= 1 << (t % 32)
            return
        self._m.fill_next_token_bitmask(bitmask, row)

    @property
    def completed(self) -> bool:
        """The output so far is a whole sentence of the grammar (EOS is allowed now)."""
        return self._m.is_completed()

    def accept(self, token_id: int) -> bool:
        if self._m.is_terminated():
            return token_id in self._m.stop_token_ids
        return self._m.accept_token(token_id)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Masks (to -inf) the tokens ``bitmask`` forbids in ``logits``' ``rows``, in place.

    On CPU an addition of 0 / -inf looked up per byte of the mask: 0.35 ms for 16 rows of
    49,152 tokens where xgrammar's CPU kernel takes 1.24 ms (2-core EPYC), which is most of
    what a constraint adds to a 16-stream decode step. Elsewhere, xgrammar's kernel."""
    if logits.device.type != "cpu" or sys.byteorder != "little":
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        return
    n, vocab = len(rows), logits.shape[-1]
    every = rows == list(range(logits.shape[0]))
    words = bitmask if every and bitmask.shape[0] == n else bitmask[rows]
    # a little-endian int32 word's byte j holds tokens 8j..8j+7 of its 32, lowest bit first
    add = _byte_masks(logits.dtype)[words.contiguous().view(torch.uint8).long()]
    add = add.view(n, -1)[:, :vocab]
    if every:
        logits.add_(add)
    else:
        logits[rows] += add


@functools.cache
def _byte_masks(dtype: torch.dtype) -> torch.Tensor:
    """``[256, 8]``: for each byte of a token bitmask, 0 where its bit allows the token and
    -inf where it forbids it."""
    allowed = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return torch.where(allowed.bool(), 0.0, float("-inf")).to(dtype)
