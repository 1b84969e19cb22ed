"""``ragserve buckets plan``: bucket lists planned from the lengths a server has really served.

``--from`` takes a running server (``http(s)://host:port``: its ``GET /v1/buckets``), a saved
``/v1/buckets`` body, or a JSON-lines file of ``{"prompt_tokens": N, "total_tokens": M}``
(or ``{"prompt": N, "context": M}``). For a few bucket counts around the current one it prints
the least-padding context-encoding and token-generation lists (:func:`bucketing.plan_buckets`),
their padding on the sample next to the current lists', and the flags that set them.

Padding is padded tokens / real tokens (1.0: none). Prefill cost is not modelled here: the cost
model of ``benchmarks/bucketing.py`` is fitted to a benchmark run's timings, so this reports
padding only. Standard library only (no torch): it runs anywhere the server's URL is reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketing import generate_buckets, generate_dense_buckets, padding_ratio, plan_buckets
from bucketing.sample import LengthSample, SampleError

#: the serve flags and their variables (server.config.env_name; not imported: it loads torch)
CE_FLAG, TG_FLAG = "--context-encoding-buckets", "--token-generation-buckets"
CE_ENV, TG_ENV = "RAGSERVE_CONTEXT_ENCODING_BUCKETS", "RAGSERVE_TOKEN_GENERATION_BUCKETS"
DEFAULT_MIN_BUCKET = 128
MAX_ALIGN = 64


class PlanError(Exception):
    """Why no plan can be made (an unreachable server, a bad file, an empty sample)."""


@dataclass
class Source:
    """What ``--from`` gave: the sample and, from a server or a saved body, its lists."""

    sample: LengthSample
    context_encoding_buckets: list[int] | None = None
    token_generation_buckets: list[int] | None = None
    max_model_len: int | None = None


def _int_list(obj: dict[str, Any], key: str) -> list[int] | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(n, int) and n >= 1 for n in v):
        raise PlanError(f"{key} must be a non-empty list of integers >= 1")
    return sorted(v)


def source_from_json(obj: Any) -> Source:
    """A :class:`Source` from a ``GET /v1/buckets`` body (or any sample object)."""
    try:
        sample = LengthSample.from_json(obj)
    except SampleError as e:
        raise PlanError(str(e)) from None
    mml = obj.get("max_model_len")
    return Source(sample, _int_list(obj, "context_encoding_buckets"),
                  _int_list(obj, "token_generation_buckets"),
                  mml if isinstance(mml, int) and mml >= 1 else None)


def fetch(url: str, api_key: str | None, timeout: float = 30.0) -> Source:
    """``GET {url}/v1/buckets`` (with ``Authorization: Bearer``), as a :class:`Source`."""
    endpoint = url.rstrip("/") + "/v1/buckets"
    req = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        hint = " (pass --api-key or set RAGSERVE_API_KEY)" if e.code == 401 else ""
        raise PlanError(f"GET {endpoint} answered {e.code}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PlanError(f"cannot reach {endpoint}: {reason}") from None
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        raise PlanError(f"GET {endpoint} did not return JSON") from None
    return source_from_json(obj)


def load_source(where: str, api_key: str | None = None) -> Source:
    """``--from``: a URL, a saved ``/v1/buckets`` JSON or a lengths JSONL file."""
    if where.startswith(("http://", "https://")):
        return fetch(where, api_key)
    try:
        sample = LengthSample.read(where)  # a JSON object or JSON lines: it says what is wrong
        whole = json.loads(Path(where).read_text())
    except SampleError as e:
        raise PlanError(str(e)) from None
    except ValueError:  # JSON lines: no lists in them
        return Source(sample)
    return source_from_json(whole) if isinstance(whole, dict) else Source(sample)


def k_values(current: int, given: Sequence[int] | None) -> list[int]:
    """The bucket counts to plan for: ``given``, else ``current - 2 .. current + 2`` (>= 1).

    >>> k_values(5, None), k_values(2, None), k_values(5, [3, 1, 3])
    ([3, 4, 5, 6, 7], [1, 2, 3, 4], [1, 3])
    """
    ks = given or range(current - 2, current + 3)
    return sorted({k for k in ks if k >= 1})


def _align(max_len: int, current: Sequence[int] | None, given: int | None) -> int:
    """``--align``, else the smallest current bucket, at most 64 and at most ``max_len``."""
    if given:
        return given
    return max(1, min(MAX_ALIGN, max_len, *((current or [])[:1] or [MAX_ALIGN])))


def plan_phase(lengths: Sequence[int], current: list[int] | None, default: list[int],
               max_len: int, ks: Sequence[int] | None, align: int | None) -> dict[str, Any]:
    """One list's plans: for each k the least-padding list and its padding, next to the
    baseline's (the current list, else ragserve's default for ``max_len``)."""
    baseline = current or default
    fit = [n for n in lengths if n <= max_len]
    a = _align(max_len, current, align)
    out: dict[str, Any] = {
        "max_len": max_len, "align": a, "sample": len(lengths),
        "not_fitting": len(lengths) - len(fit),
        "baseline": "current" if current else "default", "baseline_buckets": baseline,
        "baseline_padding_ratio": _ratio(fit, baseline), "plans": []}
    if not fit:
        return out
    for k in k_values(len(baseline), ks):
        planned = plan_buckets(fit, k, max_len, align=a)
        r = _ratio(fit, planned)
        base = out["baseline_padding_ratio"]
        out["plans"].append({
            "k": k, "buckets": planned, "padding_ratio": r,
            "padding_vs_baseline": round(r / base, 4) if r and base else None})
    return out


def _ratio(lengths: Sequence[int], buckets: Sequence[int]) -> float | None:
    fit = [n for n in lengths if n <= buckets[-1]]
    return round(padding_ratio(fit, buckets), 4) if fit else None


def plan(src: Source, ks: Sequence[int] | None = None, align: int | None = None,
         max_model_len: int | None = None) -> dict[str, Any]:
    """The whole report for ``src`` (what ``--json`` prints)."""
    prompts, contexts = src.sample.prompt_lengths, src.sample.context_lengths
    if not prompts and not contexts:
        raise PlanError("the sample is empty (no finished requests yet, or an empty file)")
    ce, tg = src.context_encoding_buckets, src.token_generation_buckets
    mml = max_model_len or src.max_model_len or (tg[-1] if tg else None) or max(
        prompts + contexts)
    ce_max = ce[-1] if ce else mml
    tg_max = tg[-1] if tg else mml
    report: dict[str, Any] = {
        "sample_size": {"prompt": len(prompts), "context": len(contexts)},
        "max_model_len": mml,
        "cost_model": None,
        "note": "padding only: prefill cost is not modelled (benchmarks/bucketing.py fits its "
                "cost model to measured timings)",
    }
    for key, lengths, current, default, max_len, flag, env in (
            ("context_encoding", prompts, ce,
             generate_dense_buckets(min(DEFAULT_MIN_BUCKET, ce_max), ce_max), ce_max,
             CE_FLAG, CE_ENV),
            ("token_generation", contexts, tg,
             generate_buckets(min(DEFAULT_MIN_BUCKET, tg_max), tg_max), tg_max, TG_FLAG,
             TG_ENV)):
        if not lengths:
            report[key] = None
            continue
        phase = plan_phase(lengths, current, default, max_len, ks, align)
        for p in phase["plans"]:
            text = ",".join(map(str, p["buckets"]))
            p["flag"] = f"{flag} {text}"
            p["env"] = f"{env}={text}"
        report[key] = phase
    return report


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def format_report(report: dict[str, Any], source: str) -> str:
    """The report as text."""
    s = report["sample_size"]
    lines = [f"Sample from {source}: {s['prompt']} prompt lengths, {s['context']} decode "
             f"context lengths (max_model_len {report['max_model_len']}).",
             "Padding = padded tokens / real tokens on the sample (1.000 = none). "
             "Prefill cost is not modelled: padding only."]
    titles = {"context_encoding": "Context-encoding (prefill) buckets, for prompt lengths",
              "token_generation": "Token-generation (decode) buckets, for prompt + generated "
                                  "tokens"}
    for key, title in titles.items():
        phase = report[key]
        lines.append("")
        if phase is None:
            lines.append(f"{title}: no lengths in the sample.")
            continue
        lines.append(f"{title} (max {phase['max_len']}, multiples of {phase['align']}):")
        base = ",".join(map(str, phase["baseline_buckets"]))
        lines.append(f"  {phase['baseline']} ({len(phase['baseline_buckets'])}): {base}"
                     f"  padding {_fmt(phase['baseline_padding_ratio'])}")
        for p in phase["plans"]:
            vs = p["padding_vs_baseline"]
            rel = f" ({(vs - 1) * 100:+.1f}% vs {phase['baseline']})" if vs else ""
            lines.append(f"  k={p['k']}: padding {_fmt(p['padding_ratio'])}{rel}")
            lines.append(f"    {p['flag']}")
            lines.append(f"    {p['env']}")
        if phase["not_fitting"]:
            lines.append(f"  {phase['not_fitting']} of {phase['sample']} lengths are above "
                         f"{phase['max_len']} and fit no bucket (not counted above).")
    return "\n".join(lines)


def add_buckets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("buckets", help="bucket lists from observed traffic (plan)")
    bsub = p.add_subparsers(dest="buckets_command", required=True)
    plan_p = bsub.add_parser(
        "plan", help="least-padding bucket lists for the lengths a server has served",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_p.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="http(s)://host:port (its GET /v1/buckets), a saved /v1/buckets "
                             "JSON, or a JSONL file of {prompt_tokens, total_tokens} lines")
    plan_p.add_argument("--k", type=int, action="append", default=None, metavar="N",
                        help="a bucket count to plan for (repeatable; default: the current "
                             "count and two either side)")
    plan_p.add_argument("--align", type=int, default=None,
                        help="bucket lengths are multiples of this (default: the smallest "
                             "current bucket, at most 64)")
    plan_p.add_argument("--max-model-len", type=int, default=None,
                        help="the longest sequence (default: the server's, else the largest "
                             "token-generation bucket, else the longest length seen)")
    plan_p.add_argument("--api-key", default=os.environ.get("RAGSERVE_API_KEY"),
                        help="sent as a Bearer token to a URL (default: $RAGSERVE_API_KEY)")
    plan_p.add_argument("--json", action="store_true", help="print one JSON object")
    plan_p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    for name in ("k", "align", "max_model_len"):
        values = getattr(args, name)
        values = values if isinstance(values, list) else [values]
        if any(v is not None and v < 1 for v in values):
            print(f"ragserve buckets plan: error: --{name.replace('_', '-')} must be >= 1",
                  file=sys.stderr)
            return 2
    try:
        report = plan(load_source(args.source, args.api_key), args.k, args.align,
                      args.max_model_len)
    except PlanError as e:
        print(f"ragserve buckets plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"source": args.source, **report}))
    else:
        print(format_report(report, args.source))
    return 0
