"""The three grammar libraries on ragserve's tokenizers: how ragserve chose its structured-output
backend (``runtime/structured.py``).

For each library (xgrammar, llguidance, outlines-core) and tokenizer (the embedded SmolLM2's
49,152 tokens, Llama 3's 128,256): the one-off tokenizer setup, the cold compile of a
20-property JSON schema, the cost of one token's bitmask while a valid answer is walked token
by token, and which hostile or uncommon schemas each refuses at compile time.

    python -m benchmarks.grammar_libs [--quick]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import emit, median, parser

SCHEMA_20 = {
    "type": "object",
    "properties": {
        **{f"field_{i}": {"type": "string", "maxLength": 24} for i in range(8)},
        **{f"count_{i}": {"type": "integer", "minimum": 0} for i in range(6)},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "owner": {"type": "object", "properties": {"name": {"type": "string"},
                                                   "id": {"type": "integer"}},
                  "required": ["name", "id"], "additionalProperties": False},
        "note": {"type": ["string", "null"]},
    },
    "additionalProperties": False,
}
SCHEMA_20["required"] = list(SCHEMA_20["properties"])

VALID_20 = {**{f"field_{i}": f"value {i}" for i in range(8)},
            **{f"count_{i}": i * 7 for i in range(6)}, "score": 3.25, "active": True,
            "tags": ["a", "b"], "kind": "beta", "owner": {"name": "Ada", "id": 1}, "note": None}

HOSTILE = {
    "recursive_ref": {"$defs": {"node": {"type": "object", "properties": {
        "child": {"$ref": "#/$defs/node"}}}}, "$ref": "#/$defs/node"},
    "dangling_ref": {"$ref": "#/$defs/missing"},
    "pattern": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    "bad_type": {"type": "strnig"},
    "format_date": {"type": "string", "format": "date"},
}


def tokenizers() -> dict[str, Any]:
    from runtime.loader import load_tokenizer, resolve_model

    out = {"smollm2": load_tokenizer(resolve_model(None).path)}
    try:  # Llama 3's, as the tests build it (llama-models ships the tiktoken file)
        import importlib.util
        import tempfile

        from llama_models.llama3.tokenizer import Tokenizer
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast

        spec = importlib.util.find_spec("llama_models")
        model = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
        d = tempfile.mkdtemp()
        convert_tiktoken_to_fast(Tokenizer(model).model, d)
        out["llama3"] = PreTrainedTokenizerFast(tokenizer_file=f"{d}/tokenizer.json",
                                                eos_token="<|eot_id|>")
    except ImportError:
        pass
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


class XGrammar:
    name = "xgrammar"

    def setup(self, tok: Any) -> Any:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        return info

    def compile(self, info: Any, schema: dict) -> Any:
        import xgrammar as xgr

        return xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(schema), any_whitespace=False)

    def walk(self, compiled: Any, ids: list[int], vocab: int) -> list[float]:
        import xgrammar as xgr

        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            if not m.accept_token(t):
                raise RuntimeError(f"xgrammar refused token {t}")
        return times


class LLGuidance:
    name = "llguidance"

    def setup(self, tok: Any) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))

    def compile(self, info: Any, schema: dict) -> Any:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ",
                             "key_separator": ": "})
        err = llguidance.LLMatcher.validate_grammar(grammar, info)
        if err:
            raise ValueError(err)
        m = llguidance.LLMatcher(info, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return (info, grammar)

    def walk(self, compiled: Any, ids: list[int], vocab: int) -> list[float]:
        import llguidance
        import llguidance.torch

        info, grammar = compiled
        m = llguidance.LLMatcher(info, grammar)
        mask = llguidance.torch.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t0)
            if not m.consume_token(t):
                raise RuntimeError(f"llguidance refused token {t}: {m.get_error()}")
        return times


class OutlinesCore:
    name = "outlines-core"

    def setup(self, tok: Any) -> Any:
        from outlines_core import Vocabulary

        eos = tok.eos_token_id
        vocab: dict[str, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i == eos:
                continue
            text = tok.convert_tokens_to_string([token])
            vocab.setdefault(text, []).append(i)
        return Vocabulary(eos, vocab)

    def compile(self, info: Any, schema: dict) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema)), info)

    def walk(self, compiled: Any, ids: list[int], vocab: int) -> list[float]:
        import torch
        from outlines_core import Guide

        g = Guide(compiled)
        mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            times.append(time.perf_counter() - t0)
            g.advance(t)
        return times


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    libs = [XGrammar(), LLGuidance(), OutlinesCore()]
    answer = json.dumps(VALID_20, separators=(", ", ": "))
    results: dict[str, Any] = {}
    for tname, tok in tokenizers().items():
        ids = tok.encode(answer, add_special_tokens=False)
        for lib in libs:
            key = f"{lib.name}/{tname}"
            try:
                info, setup_s = timed(lambda: lib.setup(tok))  # noqa: B023
                compiles = []
                for _ in range(1 if args.quick else 3):
                    compiled, s = timed(lambda: lib.compile(info, SCHEMA_20))  # noqa: B023
                    compiles.append(s)
                masks = lib.walk(compiled, ids, len(tok))
                refused = {}
                for hname, schema in HOSTILE.items():
                    try:
                        lib.compile(info, schema)
                        refused[hname] = None
                    except Exception as e:  # what each library says, verbatim
                        refused[hname] = str(e).splitlines()[0][:120]
                results[key] = {
                    "setup_s": round(setup_s, 3),
                    "compile_ms_p50": round(median(compiles) * 1e3, 2),
                    "mask_us_p50": round(median(masks) * 1e6, 1),
                    "mask_us_max": round(max(masks) * 1e6, 1),
                    "tokens_walked": len(ids),
                    "refused_at_compile": refused,
                }
            except Exception as e:
                results[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(key, json.dumps(results[key]), flush=True)
    emit("grammar_libs", args, {"results": results})


if __name__ == "__main__":
    main()
