"""The two length histograms for bucket planning, on ``/metrics`` and read back from a dump.

``ragserve_prompt_length_tokens`` (prompt tokens) and ``ragserve_decode_context_length_tokens``
(prompt plus generated tokens when the request ends) count the lengths of the finished
requests that :mod:`bucketing.sample` samples, in the fixed bins of
:func:`bucketing.histogram.length_bounds`. :class:`LengthCollector` writes them (for
:class:`server.metrics.Metrics`); :func:`read_exposition` reads them back from a Prometheus
text exposition (``curl host:port/metrics``, a Prometheus federation dump) for ``ragserve
buckets plan``, summed over every label set but ``le``. prometheus_client and bucketing only
(no torch): both sides import it, the server (:mod:`server.metrics`) and
:mod:`planning.buckets`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from bucketing.histogram import BinnedLengths, LengthHistogram

PROMPT = "ragserve_prompt_length_tokens"
CONTEXT = "ragserve_decode_context_length_tokens"
HELP = {
    PROMPT: "Prompt tokens of each finished request, in fine fixed bins for `ragserve buckets "
            "plan` (bins: bucketing.histogram.length_bounds(max_model_len)).",
    CONTEXT: "Prompt plus generated tokens of each finished request (the longest context its "
             "decode ran at), in the bins of ragserve_prompt_length_tokens.",
}
MODEL_LABEL = "model_name"

#: the first line of a text exposition: a comment (# HELP, # TYPE) or a sample
_EXPOSITION_LINE = re.compile(r"#|[A-Za-z_:][A-Za-z0-9_:]*[{\s]")


class ExpositionError(ValueError):
    """A text that holds no usable length histograms; the message says why."""


class LengthCollector:
    """Yields the two histograms from the server's :class:`LengthHistogram` pair, read at
    scrape time. Before the pair exists (the model has not loaded: the bins depend on its
    ``max_model_len``) the families are declared with no samples."""

    def __init__(self, histograms: Callable[[], tuple[LengthHistogram, LengthHistogram] | None],
                 model_name: Callable[[], str]) -> None:
        self._histograms = histograms
        self._model_name = model_name

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(name, doc, labels=[MODEL_LABEL])
                for name, doc in HELP.items()]

    def collect(self) -> Iterator[Metric]:
        pair = self._histograms()
        for (name, doc), h in zip(HELP.items(), pair or (None, None), strict=True):
            family = HistogramMetricFamily(name, doc, labels=[MODEL_LABEL])
            if h is not None:
                b = h.snapshot()
                cumulative = b.cumulative()
                buckets = [(floatToGoString(bound), n) for bound, n in zip(b.bounds, cumulative)]
                family.add_metric([self._model_name()], [*buckets, ("+Inf", cumulative[-1])],
                                  sum_value=b.total)
            yield family


def is_exposition(text: str) -> bool:
    """Whether ``text`` reads as a Prometheus text exposition (not JSON): its first line is a
    comment or a sample.

    >>> is_exposition('# HELP x y'), is_exposition('{"prompt": 3}'), is_exposition('x{a="b"} 1')
    (True, False, True)
    """
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return bool(_EXPOSITION_LINE.match(first))


@dataclass(frozen=True)
class ExposedLengths:
    """The two histograms of a dump, each summed over its label sets (None: not in the dump),
    how many histograms were summed (label sets, or the same one repeated: dumps of several
    servers concatenated) and the ``model_name`` they carry (None: unlabelled)."""

    prompt: BinnedLengths | None
    context: BinnedLengths | None
    summed: int
    model: str | None

    @property
    def max_model_len(self) -> int | None:
        """The largest finite bin bound: a server's ``max_model_len`` (its last bound)."""
        bounds = [b.bounds[-1] for b in (self.prompt, self.context) if b and b.bounds]
        return max(bounds) if bounds else None


def _le(value: str) -> int | float:
    """An ``le`` label as an integer length bound (``math.inf`` for +Inf): a length n <= le
    is n <= floor(le)."""
    try:
        bound = float(value)
    except ValueError:
        raise ExpositionError(f"le={value!r} is not a number") from None
    if bound == math.inf:
        return bound
    if math.isnan(bound) or bound < 1:
        raise ExpositionError(f"le={value!r} is not a length bound >= 1")
    return math.floor(bound)


@dataclass
class _Series:
    """One histogram's samples: ``_bucket`` counts by bound (an int; ``+Inf`` as
    ``math.inf``), ``"sum"`` and ``"count"``."""

    samples: dict[int | float | str, float] = field(default_factory=dict)

    def binned(self) -> BinnedLengths:
        buckets = {b: v for b, v in self.samples.items() if isinstance(b, int)}
        if not buckets:
            raise ValueError("no _bucket sample with a finite le")
        count = self.samples.get(math.inf, self.samples.get("count", max(buckets.values())))
        return BinnedLengths.from_cumulative(buckets.items(), count, self.samples.get("sum"))


def read_exposition(text: str, model: str | None = None) -> ExposedLengths:
    """The length histograms in a text exposition, each summed over its label sets (replicas,
    instances). With series of several ``model_name`` values, ``model`` picks one (lengths of
    different models' tokenizers do not add up); :class:`ExpositionError` if none is given, if
    it is not there, or if the text holds neither histogram.

    >>> text = '''# TYPE ragserve_prompt_length_tokens histogram
    ... ragserve_prompt_length_tokens_bucket{le="32.0",model_name="m"} 2.0
    ... ragserve_prompt_length_tokens_bucket{le="64.0",model_name="m"} 3.0
    ... ragserve_prompt_length_tokens_bucket{le="+Inf",model_name="m"} 3.0
    ... ragserve_prompt_length_tokens_sum{model_name="m"} 70.0
    ... '''
    >>> read_exposition(text).prompt
    BinnedLengths(bounds=(32, 64), counts=(2, 1), above=0, total=70.0)
    """
    # per histogram and label set, one _Series per occurrence: a sample seen again starts
    # the next (dumps of several servers concatenated, each labelled only model_name)
    found: dict[str, dict[frozenset, list[_Series]]] = {PROMPT: {}, CONTEXT: {}}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name, _, suffix = s.name.rpartition("_")
                if name not in found or suffix not in ("bucket", "sum", "count"):
                    continue
                key = frozenset((k, v) for k, v in s.labels.items() if k != "le")
                if suffix == "bucket" and "le" not in s.labels:
                    raise ExpositionError(f"{s.name}{{{_labels(key)}}} has no le label")
                field_name = suffix if suffix != "bucket" else _le(s.labels["le"])
                occurrences = found[name].setdefault(key, [_Series()])
                if field_name in occurrences[-1].samples:
                    occurrences.append(_Series())
                occurrences[-1].samples[field_name] = s.value
    except ExpositionError:
        raise
    except ValueError as e:  # the parser's: a malformed line
        raise ExpositionError(f"not a Prometheus text exposition: {e}") from None
    if not any(found.values()):
        raise ExpositionError(f"no {PROMPT} or {CONTEXT} histogram in the text (a ragserve "
                              "server exports them on /metrics once its model has loaded)")
    return _merge(found, model)


def from_series(series: Iterable[tuple[str, dict[str, str], dict[str, float]]],
                model: str | None = None) -> ExposedLengths:
    """The length histograms from already-parsed series (a Prometheus query's results), as
    :func:`read_exposition` builds them from a text: ``(name, labels but le, samples)``, the
    samples keyed by ``le`` (cumulative counts) and ``"sum"``, ``"count"``. One series per
    histogram and label set; ``model`` as for :func:`read_exposition`.

    >>> from_series([(PROMPT, {}, {"32": 2, "64": 3, "+Inf": 3, "sum": 70.0})]).prompt
    BinnedLengths(bounds=(32, 64), counts=(2, 1), above=0, total=70.0)
    """
    found: dict[str, dict[frozenset, list[_Series]]] = {PROMPT: {}, CONTEXT: {}}
    for name, labels, samples in series:
        if name not in found:
            raise ExpositionError(f"{name} is not a length histogram ({PROMPT}, {CONTEXT})")
        fields = {k if k in ("sum", "count") else _le(k): v for k, v in samples.items()}
        found[name].setdefault(frozenset(labels.items()), []).append(_Series(fields))
    if not any(found.values()):
        raise ExpositionError(f"no {PROMPT} or {CONTEXT} series")
    return _merge(found, model)


def _merge(found: dict[str, dict[frozenset, list[_Series]]],
           model: str | None) -> ExposedLengths:
    """Each histogram's series of one ``model_name`` summed (see :func:`read_exposition`)."""
    models = sorted({dict(key).get(MODEL_LABEL, "") for sets in found.values() for key in sets})
    if model is not None:
        if model not in models:
            raise ExpositionError(f"no length histograms of model_name={model!r} (the "
                                  f"source has {', '.join(map(repr, models))})")
        models = [model]
    elif len(models) > 1:
        raise ExpositionError(f"the source has length histograms of {len(models)} models "
                              f"({', '.join(map(repr, models))}): pick one with --model")
    merged: dict[str, BinnedLengths | None] = {}
    summed = 0
    for name, sets in found.items():
        parts = []
        for key, occurrences in sets.items():
            if dict(key).get(MODEL_LABEL, "") != models[0]:
                continue
            for series in occurrences:
                try:
                    parts.append(series.binned())
                except ValueError as e:
                    raise ExpositionError(f"{name}{{{_labels(key)}}}: {e}") from None
        summed = max(summed, len(parts))
        merged[name] = BinnedLengths.merge(parts) if parts else None
    return ExposedLengths(merged[PROMPT], merged[CONTEXT], summed, models[0] or None)


def _labels(key: frozenset) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(key))
