"""Whether a waiting prompt should join the running requests' decode step, from step costs
measured on this machine.

A mixed step (``Scheduler(mixed=True)``) runs the running requests' next tokens and the
admitted prompts through every matmul once, so the weights are read once for both; but its
decode rows then run on the eager path that ragged shapes need, where a decode step alone may
run a compiled graph. Which costs less, one mixed step or a decode step and a prefill step
apart, differs by CPU (on one 2-core Xeon mixed steps lost 21% of throughput where on an EPYC
they gained 4%), by the number of decode rows and by the prompt tokens. So the backend times the
three on a grid of decode rows x prompt tokens before it reports ready
(``TorchBackend.settle``), and the scheduler asks :meth:`StepCosts.joins` for each step that
has prompts to admit and requests running.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, ClassVar


def _interp(xs: tuple[int, ...], ys: list[float], x: float) -> float:
    """Piecewise-linear ``ys`` over ``xs`` at ``x``, held constant past either end."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class StepCosts:
    """Median seconds per step, measured: ``decode[i]`` a decode step of ``rows[i]`` rows (the
    path decode steps take: compiled when it won), ``prefill[j]`` prompts of ``tokens[j]``
    tokens alone, ``mixed[i][j]`` both in one step.

    >>> c = StepCosts((1, 8), (32, 256), (0.010, 0.020), (0.015, 0.080),
    ...               ((0.020, 0.085), (0.0365, 0.110)))
    >>> round(c.saving(1, 32), 4), round(c.saving(8, 32), 4), round(c.saving(8, 256), 4)
    (0.005, -0.0015, -0.01)
    >>> c.joins(1, 32), c.joins(8, 32), c.joins(8, 256)  # 1.5 of 36.5 ms is noise; 10 of 110 not
    (True, True, False)
    """

    MARGIN: ClassVar[float] = 0.05

    rows: tuple[int, ...]
    tokens: tuple[int, ...]
    decode: tuple[float, ...]
    prefill: tuple[float, ...]
    mixed: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if (not self.rows or not self.tokens or len(self.decode) != len(self.rows)
                or len(self.prefill) != len(self.tokens) or len(self.mixed) != len(self.rows)
                or any(len(m) != len(self.tokens) for m in self.mixed)
                or list(self.rows) != sorted(set(self.rows))
                or list(self.tokens) != sorted(set(self.tokens))):
            raise ValueError("step costs need one time per grid point on sorted axes")

    def saving(self, rows: int, tokens: int) -> float:
        """Seconds one mixed step saves over a decode step and a prefill step apart (negative:
        what it costs), interpolated over the grid."""
        gains = [[self.decode[i] + self.prefill[j] - self.mixed[i][j]
                  for j in range(len(self.tokens))] for i in range(len(self.rows))]
        per_row = [_interp(self.tokens, g, tokens) for g in gains]
        return _interp(self.rows, per_row, rows)

    def mixed_seconds(self, rows: int, tokens: int) -> float:
        per_row = [_interp(self.tokens, list(m), tokens) for m in self.mixed]
        return _interp(self.rows, per_row, rows)

    def joins(self, rows: int, tokens: int) -> bool:
        """Whether prompts of ``tokens`` tokens should join a decode step of ``rows`` rows:
        unless a mixed step costs more than :attr:`MARGIN` of itself over the two steps apart.
        Within that margin the timings are noise, and a mixed step wins on what they do not
        measure: the running streams do not stall for the prompt."""
        return self.saving(rows, tokens) > -self.MARGIN * self.mixed_seconds(rows, tokens)

    def summary(self) -> str:
        """Where mixing pays, for the log: the saving in ms at each grid point."""
        return "; ".join(
            f"{r} rows: " + ", ".join(f"{t} tok {self.saving(r, t) * 1e3:+.1f} ms"
                                      for t in self.tokens)
            for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "tokens": list(self.tokens),
                "decode": list(self.decode), "prefill": list(self.prefill),
                "mixed": [list(m) for m in self.mixed]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepCosts:
        return cls(tuple(data["rows"]), tuple(data["tokens"]), tuple(data["decode"]),
                   tuple(data["prefill"]), tuple(tuple(m) for m in data["mixed"]))
