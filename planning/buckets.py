"""``ragserve buckets plan``: bucket lists planned from the lengths a server has really served.

``--from`` takes a running server (``http(s)://host:port``: its ``GET /v1/buckets``), a saved
``/v1/buckets`` body, a JSON-lines file of ``{"prompt_tokens": N, "total_tokens": M}``
(or ``{"prompt": N, "context": M}``), or a Prometheus text exposition: a server's
``http(s)://host:port/metrics`` (with the API key), a Prometheus ``/federate`` URL, or a saved
dump of either; or a Prometheus server, ``prometheus+http(s)://host:port`` (its HTTP API:
the histograms' ``increase()`` over ``--window``, default 7d, across replicas and restarts:
:mod:`planning.prometheus`). For a few bucket counts around the current one it prints
the least-padding context-encoding and token-generation lists
(:func:`bucketing.plan_buckets`), their padding on the sample next to the current lists', the
relative prefill cost of each context-encoding list, and the flags that set them.

From a Prometheus text the sample is the histograms ``ragserve_prompt_length_tokens`` and
``ragserve_decode_context_length_tokens`` (:mod:`planning.length_histograms`), summed over their
label sets (replicas; dumps of several servers concatenated); ``--model`` picks one
``model_name`` where there are several. From a Prometheus server they are summed over the
replicas by the queries; their increase is extrapolated, so the cumulative counts are made
non-decreasing and rounded to whole requests (the report says how many were), and the token
for Prometheus is ``--prometheus-token`` (``$RAGSERVE_PROMETHEUS_TOKEN``): ``--api-key`` is
ragserve's and is never sent to it. Every request counts, not a sample of 10,000, with
its bin's upper bound for its length: exact for bucket lengths that are multiples of the bin
width (32 tokens up to 2,048, 64 up to 8,192: :func:`bucketing.histogram.length_bounds`),
since every length in a bin then needs the same bucket; the report counts the lengths in
bins that a planned or baseline bucket splits. The real tokens (the padding's denominator)
are the histograms' ``_sum``. Counts are kept as counts (``plan_buckets(..., counts=)``), never
expanded into a list. A Prometheus text names no bucket lists: the baseline is ragserve's
default for its ``max_model_len`` (the histograms' last bound), as for a JSONL file.

Padding is padded tokens / real tokens (1.0: none). Prefill cost is the mean cost of the bucket
each sampled prompt runs in under ``t = c + a*L + b*L^2`` (:mod:`bucketing.cost`), over the
same with the current (or default) list: 0.95 is 5% cheaper. The model is fitted to the
server's own one-prompt prefill steps when it timed at least 3 bucket lengths
(``prefill_seconds_by_bucket`` in ``GET /v1/buckets``), else it is the device's documented
default (:func:`bucketing.cost.default_cost`: the benchmark's fit on CPU, padded tokens where
no fit is known); ``--cost-model tokens`` forces padded tokens. The plans still minimise padding,
not this cost; decode cost is not modelled. It imports bucketing, prometheus_client and the
standard library only, never the server (the flags, variables and devices it names are
bucketing's: :data:`bucketing.CONTEXT_ENCODING_FLAG`, :data:`bucketing.cost.DEVICES`), and no
torch: it runs anywhere the server's URL is reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bucketing import (
    CONTEXT_ENCODING_ENV,
    CONTEXT_ENCODING_FLAG,
    TOKEN_GENERATION_ENV,
    TOKEN_GENERATION_FLAG,
    BucketConfig,
    padding_ratio,
    plan_buckets,
)
from bucketing.cost import (
    DEVICES,
    TOKENS,
    PrefillCost,
    PrefillTimes,
    default_cost,
    fit_cost,
    relative_cost,
)
from bucketing.histogram import Lengths
from bucketing.sample import LengthSample, SampleError
from planning.length_histograms import (
    CONTEXT,
    PROMPT,
    ExposedLengths,
    ExpositionError,
    is_exposition,
    read_exposition,
)
from planning.prometheus import (
    DEFAULT_WINDOW,
    PrometheusError,
    Window,
    is_prometheus,
    read_window,
)

MAX_ALIGN = 64
#: timed prefill bucket lengths needed to fit c + a*L + b*L^2 to a server's steps
MIN_FIT_BUCKETS = 3
#: --cost-model: auto (fit, else the device's default) or tokens (padded tokens)
COST_MODELS = ("auto", "tokens")
#: URL paths that serve a Prometheus text exposition (a server's, Prometheus's federation)
EXPOSITION_PATHS = ("/metrics", "/federate")


class PlanError(Exception):
    """Why no plan can be made (an unreachable server, a bad file, an empty sample)."""


@dataclass
class Source:
    """What ``--from`` gave: the sample and, from a server or a saved body, its lists, its
    device and its prefill step times; from a Prometheus text exposition, the length
    histograms instead of a sample (``sample`` is then empty)."""

    sample: LengthSample
    context_encoding_buckets: list[int] | None = None
    token_generation_buckets: list[int] | None = None
    max_model_len: int | None = None
    device: str | None = None
    prefill_times: PrefillTimes | None = None
    histograms: ExposedLengths | None = None
    window: Window | None = None

    def lengths(self) -> tuple[Lengths, Lengths]:
        """The prompt lengths and the decode context lengths to plan for."""
        h = self.histograms
        if h is not None:
            return Lengths.from_bins(h.prompt), Lengths.from_bins(h.context)
        return (Lengths(tuple(self.sample.prompt_lengths)),
                Lengths(tuple(self.sample.context_lengths)))


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
    device = obj.get("device")
    try:
        times = PrefillTimes.from_json(obj.get("prefill_seconds_by_bucket") or {})
    except ValueError as e:
        raise PlanError(str(e)) from None
    return Source(sample, _int_list(obj, "context_encoding_buckets"),
                  _int_list(obj, "token_generation_buckets"),
                  mml if isinstance(mml, int) and mml >= 1 else None,
                  device if isinstance(device, str) and device else None,
                  times if len(times) else None)


def source_from_exposition(text: str, model: str | None = None) -> Source:
    """A :class:`Source` from a Prometheus text exposition's length histograms
    (:func:`planning.length_histograms.read_exposition`); its ``max_model_len`` is their last
    bound."""
    try:
        h = read_exposition(text, model)
    except ExpositionError as e:
        raise PlanError(str(e)) from None
    return Source(LengthSample(), max_model_len=h.max_model_len, histograms=h)


def _get(endpoint: str, api_key: str | None, accept: str, timeout: float) -> bytes:
    req = urllib.request.Request(endpoint, headers={"Accept": accept})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        hint = " (pass --api-key or set RAGSERVE_API_KEY)" if e.code == 401 else ""
        raise PlanError(f"GET {endpoint} answered {e.code}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PlanError(f"cannot reach {endpoint}: {reason}") from None


def fetch(url: str, api_key: str | None, timeout: float = 30.0) -> Source:
    """``GET {url}/v1/buckets`` (with ``Authorization: Bearer``), as a :class:`Source`."""
    endpoint = url.rstrip("/") + "/v1/buckets"
    body = _get(endpoint, api_key, "application/json", timeout)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        raise PlanError(f"GET {endpoint} did not return JSON") from None
    return source_from_json(obj)


def fetch_exposition(url: str, api_key: str | None, model: str | None = None,
                     timeout: float = 30.0) -> Source:
    """``GET url`` (a server's ``/metrics``: with ``Authorization: Bearer``; Prometheus's
    ``/federate``: without, the key is ragserve's), as a :class:`Source`."""
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    key = api_key if path.endswith("/metrics") else None
    body = _get(url, key, "text/plain", timeout)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise PlanError(f"GET {url} did not return text") from None
    return source_from_exposition(text, model)


def fetch_window(url: str, window: str | None, model: str | None = None,
                 token: str | None = None, timeout: float = 30.0) -> Source:
    """The histograms' increase over ``window`` from a Prometheus server's HTTP API
    (:func:`planning.prometheus.read_window`), as a :class:`Source`."""
    try:
        h, w = read_window(url, window or DEFAULT_WINDOW, model, token, timeout)
    except PrometheusError as e:
        raise PlanError(str(e)) from None
    return Source(LengthSample(), max_model_len=h.max_model_len, histograms=h, window=w)


def _is_exposition_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).path.rstrip("/").endswith(EXPOSITION_PATHS)


def load_source(where: str, api_key: str | None = None, model: str | None = None,
                window: str | None = None, prometheus_token: str | None = None) -> Source:
    """``--from``: a server's URL (its ``/v1/buckets``), a URL ending in ``/metrics`` or
    ``/federate``, a saved ``/v1/buckets`` JSON, a lengths JSONL file, a Prometheus text
    exposition or a Prometheus server (``prometheus+http(s)://``: the increase over
    ``window``, default 7d, with ``prometheus_token``). ``model`` picks a ``model_name`` in a
    Prometheus text or server, ``window`` the range of a Prometheus server (PlanError for
    any other source)."""
    if is_prometheus(where):
        return fetch_window(where, window, model, prometheus_token)
    if window is not None:
        raise PlanError("--window is the range of a Prometheus server's query (--from "
                        "prometheus+http://host:9090); this source holds no time series")
    url = where.startswith(("http://", "https://"))
    if url and _is_exposition_url(where):
        return fetch_exposition(where, api_key, model)
    if not url:
        try:
            text = Path(where).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"cannot read {where}: {e}") from None
        if is_exposition(text):
            return source_from_exposition(text, model)
    if model is not None:
        raise PlanError("--model picks a model_name in a Prometheus text exposition (a "
                        "/metrics URL or dump); this source holds one model's lengths")
    if url:
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


def choose_cost(src: Source, max_len: int, device: str | None = None,
                mode: str = "auto") -> PrefillCost:
    """The prefill cost model for ``src``'s plans. ``tokens``: the padded-token proxy.
    ``auto``: fitted to the server's own prefill steps when they cover at least
    :data:`MIN_FIT_BUCKETS` bucket lengths, come from ``device`` (default: the server's) and
    give a cost > 0 up to ``max_len``; else :func:`bucketing.cost.default_cost` for the device,
    its source saying why the fit was not used."""
    if mode not in COST_MODELS:
        raise ValueError(f"cost model must be one of {COST_MODELS}, got {mode!r}")
    if mode == "tokens":
        return replace(TOKENS, source=f"{TOKENS.source}; --cost-model tokens")
    device = device or src.device
    times, why = src.prefill_times, ""
    if times is not None:
        timed = times.buckets
        if src.device is not None and src.device != device:
            why = f"the server's prefill times are from {src.device}, not {device}"
        elif len(timed) < MIN_FIT_BUCKETS:
            why = (f"the server timed one-prompt prefills in {len(timed)} bucket length(s), "
                   f"{MIN_FIT_BUCKETS} are needed for a fit")
        else:
            fit = PrefillCost(*fit_cost(times.points()), source=(
                f"fitted to this server's prefill steps ({times.steps} one-prompt prefills in "
                f"{len(timed)} buckets, {timed[0]}..{timed[-1]} tokens)"))
            if fit.positive_up_to(max_len):
                return fit
            why = (f"the fit to the server's {len(timed)} timed buckets is not > 0 up to "
                   f"{max_len}")
    cost = default_cost(device)
    return replace(cost, source=f"{cost.source}; {why}") if why else cost


def exact_shape_prefill(times: PrefillTimes | None) -> bool | None:
    """Whether the server prefills at exact prompt lengths (a timed step computed fewer tokens
    than its bucket: PyTorch eager), where its lists do not change its prefill cost; None
    without timings.

    >>> exact_shape_prefill(PrefillTimes.from_json({"64": {"count": 2, "mean_tokens": 40,
    ...                                                    "mean_s": 0.1}}))
    True
    """
    if times is None:
        return None
    return any(tokens < b for b, (tokens, _) in zip(times.buckets, times.points()))


def describe_cost(cost: PrefillCost) -> str:
    """The formula in words (milliseconds for a fit in seconds).

    >>> describe_cost(PrefillCost(0.135, 0.00021, 4.7e-07, "x"))
    't = 135 ms + 0.21 ms/token * L + 0.00047 ms/token^2 * L^2'
    >>> describe_cost(PrefillCost(0.0035, -8e-05, 2.4e-06, "x"))
    't = 3.5 ms - 0.08 ms/token * L + 0.0024 ms/token^2 * L^2'
    """
    if cost.is_tokens:
        return "t = L (padded tokens)"

    def term(x: float, unit: str) -> str:
        return f"{'-' if x < 0 else '+'} {abs(x) * 1e3:.3g} {unit}"

    return (f"t = {cost.c * 1e3:.3g} ms {term(cost.a, 'ms/token * L')} "
            f"{term(cost.b, 'ms/token^2 * L^2')}")


def plan_phase(lengths: Lengths, current: list[int] | None, default: list[int],
               max_len: int, ks: Sequence[int] | None, align: int | None,
               cost: PrefillCost | None = None) -> dict[str, Any]:
    """One list's plans: for each k the least-padding list and its padding, next to the
    baseline's (the current list, else ragserve's default for ``max_len``); with ``cost``, each
    plan's mean prefill cost on the sample over the baseline's (``prefill_cost_vs_baseline``).
    From a histogram, ``binned_inexact`` counts the lengths whose bin a planned length or a
    baseline bucket splits (:meth:`bucketing.histogram.Lengths.split`)."""
    baseline = current or default
    fit = lengths.within(max_len)
    a = _align(max_len, current, align)
    out: dict[str, Any] = {
        "max_len": max_len, "align": a, "sample": len(lengths),
        "not_fitting": len(lengths) - len(fit),
        "baseline": "current" if current else "default", "baseline_buckets": baseline,
        "baseline_padding_ratio": _ratio(fit, baseline), "plans": []}
    if fit.widths is not None:
        out["binned_inexact"] = fit.split(max_len, a, baseline)
    if not len(fit):
        return out
    for k in k_values(len(baseline), ks):
        planned = plan_buckets(fit.values, k, max_len, align=a, counts=fit.counts)
        r = _ratio(fit, planned)
        base = out["baseline_padding_ratio"]
        entry = {"k": k, "buckets": planned, "padding_ratio": r,
                 "padding_vs_baseline": round(r / base, 4) if r and base else None}
        if cost is not None:
            entry["prefill_cost_vs_baseline"] = round(relative_cost(
                cost, fit.values, planned, baseline, fit.counts), 4)
        out["plans"].append(entry)
    return out


def _ratio(lengths: Lengths, buckets: Sequence[int]) -> float | None:
    fit = lengths.within(buckets[-1])
    if not len(fit):
        return None
    return round(padding_ratio(fit.values, buckets, fit.counts, fit.real), 4)


def _bins(widths: Sequence[int], bounds: Sequence[int]) -> str:
    """Bin widths in words, e.g. ``32 tokens wide up to 2048, 64 up to 4096``.

    >>> _bins([32, 32, 64, 36], [32, 64, 128, 164])
    '32 tokens wide up to 64, 64 up to 128, 36 up to 164'
    """
    runs: list[list[int]] = []
    for w, b in zip(widths, bounds):
        if runs and runs[-1][0] == w:
            runs[-1][1] = b
        else:
            runs.append([w, b])
    return ", ".join(f"{w}{' tokens wide' if i == 0 else ''} up to {b}"
                     for i, (w, b) in enumerate(runs))


def histogram_summary(h: ExposedLengths) -> dict[str, Any]:
    """What a Prometheus source held: the series, label sets summed, requests and real tokens
    per histogram, and its bins."""
    out: dict[str, Any] = {"series": {"prompt": PROMPT, "context": CONTEXT},
                           "model_name": h.model, "summed": h.summed}
    parts = {"prompt": h.prompt, "context": h.context}
    out["requests"] = {k: b.count if b else 0 for k, b in parts.items()}
    out["real_tokens"] = {k: b.total if b else None for k, b in parts.items()}
    widest = max((b for b in parts.values() if b), key=lambda b: len(b.bounds))
    out["bins"] = _bins(widest.widths(), widest.bounds)
    return out


def plan(src: Source, ks: Sequence[int] | None = None, align: int | None = None,
         max_model_len: int | None = None, device: str | None = None,
         cost_model: str = "auto") -> dict[str, Any]:
    """The whole report for ``src`` (what ``--json`` prints); ``device`` and ``cost_model``
    pick the prefill cost model (:func:`choose_cost`)."""
    prompts, contexts = src.lengths()
    if not len(prompts) and not len(contexts):
        raise PlanError("the sample is empty (no finished requests yet, or an empty file)")
    ce, tg = src.context_encoding_buckets, src.token_generation_buckets
    mml = max_model_len or src.max_model_len or (tg[-1] if tg else None) or max(
        prompts.longest, contexts.longest)
    ce_max = ce[-1] if ce else mml
    tg_max = tg[-1] if tg else mml
    cost = choose_cost(src, ce_max, device, cost_model) if len(prompts) else None
    report: dict[str, Any] = {
        "sample_size": {"prompt": len(prompts), "context": len(contexts)},
        "histograms": histogram_summary(src.histograms) if src.histograms else None,
        "prometheus": None if src.window is None else {
            "url": src.window.url, "window": src.window.window,
            "queries": list(src.window.queries), "cumulative_counts": src.window.values,
            "rounded": src.window.rounded, "raised": src.window.raised},
        "max_model_len": mml,
        "device": device or src.device,
        "cost_model": None if cost is None else {
            "formula": "c + a*L + b*L^2", "c": cost.c, "a": cost.a, "b": cost.b,
            "unit": "token" if cost.is_tokens else "s", "source": cost.source},
        "exact_shape_prefill": exact_shape_prefill(src.prefill_times),
        "note": "plans minimise padded tokens, not the prefill cost; prefill_cost_vs_baseline "
                "prices each context-encoding plan with cost_model (decode cost is not "
                "modelled)",
    }
    for key, lengths, current, default, max_len, flag, env, phase_cost in (
            ("context_encoding", prompts, ce,
             list(BucketConfig.default(ce_max, 1).context_encoding_buckets), ce_max,
             CONTEXT_ENCODING_FLAG, CONTEXT_ENCODING_ENV, cost),
            ("token_generation", contexts, tg,
             list(BucketConfig.default(tg_max, 1).token_generation_buckets), tg_max,
             TOKEN_GENERATION_FLAG, TOKEN_GENERATION_ENV, None)):
        if not len(lengths):
            report[key] = None
            continue
        phase = plan_phase(lengths, current, default, max_len, ks, align, phase_cost)
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
    s, prom = report["sample_size"], report.get("prometheus")
    if prom is not None:
        source = f"Prometheus {prom['url']} (increase over the last {prom['window']})"
    lines = [f"Sample from {source}: {s['prompt']} prompt lengths, {s['context']} decode "
             f"context lengths (max_model_len {report['max_model_len']}).",
             "Padding = padded tokens / real tokens on the sample (1.000 = none)."]
    h = report.get("histograms")
    if h is not None:
        model = f" of model_name {h['model_name']}" if h["model_name"] else ""
        real = ("the histograms' _sum" if None not in h["real_tokens"].values() else
                "bins' upper bounds (no _sum in the text: padding is under-estimated)")
        summed = "1 histogram" if h["summed"] == 1 else f"{h['summed']} histograms summed"
        lines[1:1] = [
            f"  From Prometheus histograms{model} ({summed}): "
            f"{h['requests']['prompt']} requests in {h['series']['prompt']}, "
            f"{h['requests']['context']} in {h['series']['context']};",
            f"  bins {h['bins']}. A length counts at its bin's upper bound (exact when the "
            "bucket lengths are multiples of the bin width); real tokens from "
            f"{real}."]
        if prom is not None:
            lines.insert(3, f"  increase() extrapolates: {prom['rounded']} of "
                            f"{prom['cumulative_counts']} cumulative bucket counts were not "
                            "whole and were rounded to the nearest request, after "
                            f"{prom['raised']} were raised to keep them non-decreasing.")
    cost, ce = report["cost_model"], report["context_encoding"]
    if cost is not None and ce is not None:
        formula = describe_cost(PrefillCost(cost["c"], cost["a"], cost["b"], cost["source"]))
        lines += [f"Prefill cost = mean cost of the bucket each prompt runs in / the same with "
                  f"the {ce['baseline']} list (0.950x: 5% cheaper),",
                  f"  with {formula} for a graph of L tokens;",
                  f"  cost model: {cost['source']}.",
                  "  The plans minimise padding, not this cost. Decode cost is not modelled."]
        if report["exact_shape_prefill"]:
            lines.append("  This server prefills at exact prompt lengths (PyTorch eager): its "
                         "prefill buckets do not change its prefill cost; the cost column "
                         "prices static graphs (--compile, Neuron).")
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
            price = p.get("prefill_cost_vs_baseline")
            if price is not None:
                rel += f", prefill cost {price:.3f}x of {phase['baseline']}"
            lines.append(f"  k={p['k']}: padding {_fmt(p['padding_ratio'])}{rel}")
            lines.append(f"    {p['flag']}")
            lines.append(f"    {p['env']}")
        if phase["not_fitting"]:
            lines.append(f"  {phase['not_fitting']} of {phase['sample']} lengths are above "
                         f"{phase['max_len']} and fit no bucket (not counted above).")
        if phase.get("binned_inexact"):
            lines.append(f"  {phase['binned_inexact']} of {phase['sample']} lengths lie in "
                         f"bins that a multiple of {phase['align']} or a {phase['baseline']} "
                         "bucket splits: they count at the bin's upper bound (less than a "
                         "bin width over).")
    return "\n".join(lines)


def add_buckets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("buckets", help="bucket lists from observed traffic (plan)")
    bsub = p.add_subparsers(dest="buckets_command", required=True)
    plan_p = bsub.add_parser(
        "plan", help="least-padding bucket lists for the lengths a server has served",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_p.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="http(s)://host:port (its GET /v1/buckets), a saved /v1/buckets "
                             "JSON, a JSONL file of {prompt_tokens, total_tokens} lines, or "
                             "a Prometheus text exposition: http(s)://host:port/metrics, a "
                             "/federate URL or a saved dump; or a Prometheus server: "
                             "prometheus+http(s)://host:port (its HTTP API, over --window)")
    plan_p.add_argument("--model", default=None, metavar="NAME",
                        help="the model_name to read from a Prometheus text or server that "
                             "holds several (required then)")
    plan_p.add_argument("--k", type=int, action="append", default=None, metavar="N",
                        help="a bucket count to plan for (repeatable; default: the current "
                             "count and two either side)")
    plan_p.add_argument("--align", type=int, default=None,
                        help="bucket lengths are multiples of this (default: the smallest "
                             "current bucket, at most 64)")
    plan_p.add_argument("--max-model-len", type=int, default=None,
                        help="the longest sequence (default: the server's, else the largest "
                             "token-generation bucket, else the longest length seen)")
    plan_p.add_argument("--device", choices=DEVICES, default=None,
                        help="the device the lists are for: picks the default prefill cost "
                             "model when the server's own prefill times cannot be fitted "
                             "(default: the server's; unknown for a JSONL file)")
    plan_p.add_argument("--cost-model", choices=COST_MODELS, default="auto",
                        help="auto: fitted to the server's prefill times, else the device's "
                             "default; tokens: cost proportional to padded tokens")
    plan_p.add_argument("--api-key", default=os.environ.get("RAGSERVE_API_KEY"),
                        help="sent as a Bearer token to a URL (default: $RAGSERVE_API_KEY)")
    plan_p.add_argument("--window", default=None, metavar="RANGE",
                        help="for a prometheus+http(s):// source: the range of the "
                             "histograms' increase(), e.g. 7d, 12h (default: "
                             f"{DEFAULT_WINDOW})")
    plan_p.add_argument("--prometheus-token",
                        default=os.environ.get("RAGSERVE_PROMETHEUS_TOKEN"),
                        help="Bearer token for a prometheus+http(s):// source (default: "
                             "$RAGSERVE_PROMETHEUS_TOKEN; --api-key is ragserve's and is not "
                             "sent to Prometheus)")
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
        src = load_source(args.source, args.api_key, args.model, args.window,
                          args.prometheus_token)
        report = plan(src, args.k, args.align, args.max_model_len, args.device,
                      args.cost_model)
    except PlanError as e:
        print(f"ragserve buckets plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"source": args.source, **report}))
    else:
        print(format_report(report, args.source))
    return 0
