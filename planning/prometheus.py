"""The length histograms over a time window, from the Prometheus HTTP API.

``ragserve buckets plan --from prometheus+http://prom:9090 --window 7d`` reads the two length
histograms of :mod:`planning.length_histograms` as Prometheus holds them for every replica,
across restarts: per histogram, three instant queries (``GET {base}/api/v1/query``)::

    sum by (le) (increase(ragserve_prompt_length_tokens_bucket{model_name="M"}[7d]))
    sum(increase(ragserve_prompt_length_tokens_sum{model_name="M"}[7d]))
    sum(increase(ragserve_prompt_length_tokens_count{model_name="M"}[7d]))

Without a model the sums are ``by (le, model_name)`` and ``by (model_name)``, so that lengths
of several models are not added up (:func:`planning.length_histograms.from_series` then asks for
one, as for a text). ``increase()`` extrapolates to the window's edges, so its counts are not
whole numbers: each histogram's cumulative counts are made non-decreasing (each raised to the
largest before it) and then rounded to the nearest integer; :class:`Window` counts how many
were. Standard library only (urllib).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from planning.length_histograms import (
    CONTEXT,
    MODEL_LABEL,
    PROMPT,
    ExposedLengths,
    ExpositionError,
    from_series,
)

#: ``--from`` prefix of a Prometheus server's base URL
SCHEME = "prometheus+"
DEFAULT_WINDOW = "7d"
#: a PromQL range without units mixed: a count and one of s, m, h, d, w, y
_WINDOW = re.compile(r"\d+[smhdwy]")


class PrometheusError(Exception):
    """Prometheus cannot give the histograms: unreachable, an error answer, no such series."""


@dataclass(frozen=True)
class Window:
    """Where the histograms came from: the Prometheus base URL, the window, the queries run,
    and of the ``values`` cumulative counts read, how many were not whole numbers
    (``rounded``) and how many were raised to keep the counts non-decreasing (``raised``)."""

    url: str
    window: str
    queries: tuple[str, ...]
    values: int
    rounded: int
    raised: int


def is_prometheus(where: str) -> bool:
    """Whether ``--from`` names a Prometheus server.

    >>> is_prometheus("prometheus+http://prom:9090"), is_prometheus("http://prom:9090")
    (True, False)
    """
    return where.startswith((SCHEME + "http://", SCHEME + "https://"))


def check_window(window: str) -> str:
    """``window`` if it is a PromQL range such as ``7d`` or ``12h``, else PrometheusError.

    >>> check_window("7d")
    '7d'
    >>> for bad in ("1w2d", "0d", "7"):
    ...     try:
    ...         check_window(bad)
    ...     except PrometheusError as e:
    ...         print(str(e)[:24])
    --window '1w2d' is not a
    --window '0d' is not a d
    --window '7' is not a du
    """
    if not _WINDOW.fullmatch(window) or not int(window[:-1]):
        raise PrometheusError(f"--window {window!r} is not a duration like 7d, 12h or 30m (a "
                              "whole number, then s, m, h, d, w or y)")
    return window


def queries(window: str, model: str | None = None) -> dict[str, dict[str, str]]:
    """The PromQL per histogram: ``bucket``, ``sum`` and ``count``.

    >>> queries("7d", "m")[PROMPT]["bucket"]
    'sum by (le) (increase(ragserve_prompt_length_tokens_bucket{model_name="m"}[7d]))'
    >>> queries("1h")[CONTEXT]["sum"]
    'sum by (model_name) (increase(ragserve_decode_context_length_tokens_sum[1h]))'
    """
    selector = "" if model is None else f"{{{MODEL_LABEL}={json.dumps(model)}}}"
    out = {}
    for name in (PROMPT, CONTEXT):
        out[name] = {}
        for part in ("bucket", "sum", "count"):
            labels = ["le"] * (part == "bucket") + [MODEL_LABEL] * (model is None)
            by = f" by ({', '.join(labels)})" if labels else ""
            out[name][part] = f"sum{by} (increase({name}_{part}{selector}[{window}]))"
    return out


def query(base: str, promql: str, token: str | None = None,
          timeout: float = 30.0) -> list[tuple[dict[str, str], float]]:
    """An instant query's vector: ``(labels, value)`` per series. PrometheusError for an
    unreachable server, an error answer (its ``error``), anything but a vector, or no series."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        body = e.read()  # Prometheus answers 400/422/503 with {"status": "error", ...}
        if _answer(body) is None:
            hint = (" (pass --prometheus-token or set RAGSERVE_PROMETHEUS_TOKEN)"
                    if e.code in (401, 403) else "")
            raise PrometheusError(f"{base} answered {e.code} to {promql}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PrometheusError(f"cannot reach Prometheus at {base}: {reason}") from None
    answer = _answer(body)
    if answer is None:
        raise PrometheusError(f"{base}/api/v1/query did not answer Prometheus JSON")
    if answer.get("status") != "success":
        raise PrometheusError(f"Prometheus answered {answer.get('errorType') or 'an error'} "
                              f"to {promql}: {answer.get('error')}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or \
            not isinstance(data.get("result"), list):
        raise PrometheusError(f"Prometheus did not answer a vector to {promql}")
    if not data["result"]:
        raise PrometheusError(f"no series for {promql} (no such histogram in the window, or no "
                              "server of that model_name scraped)")
    out = []
    for r in data["result"]:
        try:
            out.append(({k: str(v) for k, v in r["metric"].items()}, float(r["value"][1])))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise PrometheusError(f"a malformed series in the answer to {promql}: "
                                  f"{json.dumps(r)[:200]}") from None
    return out


def _answer(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "status" in obj else None


def monotone_counts(buckets: list[tuple[str, float]]) -> tuple[list[tuple[str, int]], int, int]:
    """Cumulative ``(le, count)`` pairs from ``increase()``, in ``le`` order, each raised to
    the largest before it, then rounded to the nearest integer; and how many were raised and
    how many were not whole numbers.

    >>> monotone_counts([("64", 2.6), ("32", 2.9), ("+Inf", 3.4)])
    ([('32', 3), ('64', 3), ('+Inf', 3)], 1, 3)
    """
    try:
        ordered = sorted(buckets, key=lambda b: float(b[0]))
    except ValueError:
        bad = next(le for le, _ in buckets if not _is_number(le))
        raise PrometheusError(f"le={bad!r} is not a number") from None
    out, last, raised, rounded = [], -math.inf, 0, 0
    for le, v in ordered:
        if math.isnan(v) or v < 0:
            raise PrometheusError(f"the count at le={le} is {v}")
        if v < last:
            v, raised = last, raised + 1
        last = v
        rounded += v != round(v)
        out.append((le, round(v)))
    return out, raised, rounded


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_window(url: str, window: str = DEFAULT_WINDOW, model: str | None = None,
                token: str | None = None, timeout: float = 30.0
                ) -> tuple[ExposedLengths, Window]:
    """The two histograms' increase over ``window`` at the Prometheus of ``url``
    (``prometheus+http(s)://host:port[/prefix]``), summed over replicas, as
    :func:`planning.length_histograms.read_exposition` gives them for a text."""
    check_window(window)
    base = (url[len(SCHEME):] if url.startswith(SCHEME) else url).rstrip("/")
    series, run = [], []
    values = raised = rounded = 0
    for name, parts in queries(window, model).items():
        found: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
        for part, promql in parts.items():
            run.append(promql)
            result = query(base, promql, token, timeout)
            if part != "bucket":
                for labels, v in result:
                    found.setdefault(_key(labels), {})[part] = v
                continue
            by_key: dict[tuple[tuple[str, str], ...], list[tuple[str, float]]] = {}
            for labels, v in result:
                if "le" not in labels:
                    raise PrometheusError(f"a series without le in the answer to {promql}")
                by_key.setdefault(_key(labels), []).append((labels["le"], v))
            for key, buckets in by_key.items():
                counts, up, frac = monotone_counts(buckets)
                values, raised, rounded = values + len(counts), raised + up, rounded + frac
                found.setdefault(key, {}).update(counts)
        for key, samples in found.items():
            if "count" in samples:  # rounded like the buckets, never below them
                top = max((v for k, v in samples.items() if k not in ("sum", "count")),
                          default=0)
                raw, samples["count"] = samples["count"], round(max(samples["count"], top))
                if "sum" in samples and raw > 0:
                    # the sum's samples have the count's times, so increase() extrapolated it by
                    # the same factor: undone as the count's rounding undid it; lengths are
                    # whole tokens, so is their sum
                    samples["sum"] = round(samples["sum"] * samples["count"] / raw)
            labels = dict(key) if model is None else {**dict(key), MODEL_LABEL: model}
            series.append((name, labels, samples))
    try:
        lengths = from_series(series, model)
    except ExpositionError as e:
        raise PrometheusError(str(e)) from None
    return lengths, Window(base, window, tuple(run), values, rounded, raised)


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
