"""``ragserve neuron plan``: size a model for an Inferentia2/Trainium instance from its config.json.

Reads only ``config.json`` (no weights, no torch, no Neuron packages) and prints the HBM budget
per NeuronCore and a ``ragserve serve`` line; exits 2 with the reason when the model cannot fit.
With ``--from`` (a running server's URL, a saved ``/v1/buckets`` body, a lengths JSONL file or a
Prometheus text exposition, as ``ragserve buckets plan`` takes), the bucket lists are planned
from that traffic, with as many graphs as the power-of-two lists, instead of being powers of two:
memory and buckets in one plan.

The arithmetic is :mod:`runtime.neuron_plan`'s (the neuron backend validates with it before it
compiles); it imports the standard library and bucketing only, no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from runtime.neuron_plan import (
    INSTANCES,
    ModelShape,
    NeuronConfigError,
    Plan,
    format_plan,
    recommend,
)


def add_neuron_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neuron", help="AWS Inferentia2/Trainium tools (plan a deployment)")
    nsub = p.add_subparsers(dest="neuron_command", required=True)
    plan = nsub.add_parser(
        "plan", help="HBM budget per NeuronCore and a recommended TP/batch/bucket configuration",
        description=__doc__)
    plan.add_argument("--model", required=True, type=Path,
                      help="a model directory holding config.json (weights not needed), "
                           "or the config.json itself")
    plan.add_argument("--instance", required=True, choices=list(INSTANCES))
    plan.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    plan.add_argument("--max-model-len", type=int, default=None,
                      help="default: the model's max_position_embeddings, at most 8192")
    plan.add_argument("--max-num-seqs", type=int, default=None,
                      help="batch size to plan for (default: the largest power of two <= 64 "
                           "that fits)")
    plan.add_argument("--from", dest="source", default=None, metavar="SOURCE",
                      help="plan the bucket lists from observed traffic: http://host:port (GET "
                           "/v1/buckets), a saved /v1/buckets JSON, a lengths JSONL file or a "
                           "Prometheus text exposition (a /metrics URL or a saved dump)")
    plan.add_argument("--api-key", default=None,
                      help="for --from URL (default: $RAGSERVE_API_KEY)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)


def plan_from_traffic(plan: Plan, source: str, api_key: str | None) -> Plan:
    """``plan`` with its bucket lists replaced by the least-padding lists of the same lengths
    for the lengths ``source`` observed; the notes say what the plan gains on that sample
    (padding, and prefill cost: :func:`planning.buckets.choose_cost` for Neuron)."""
    from bucketing import padding_ratio, plan_buckets
    from bucketing.cost import relative_cost
    from planning.buckets import PlanError, choose_cost, load_source

    try:
        src = load_source(source, api_key)
    except PlanError as e:
        raise NeuronConfigError(f"--from {source}: {e}") from None
    prompts, contexts = src.lengths()  # from a histogram: lengths at bin bounds, with counts
    notes = list(plan.notes)
    lists = {}
    for key, name, lengths in (("context_encoding_buckets", "prefill", prompts),
                               ("token_generation_buckets", "decode", contexts)):
        current = list(getattr(plan, key))
        fit = lengths.within(plan.max_model_len)
        if not len(fit):
            raise NeuronConfigError(f"--from {source}: no observed {name} length fits "
                                    f"--max-model-len {plan.max_model_len}")
        planned = plan_buckets(fit.values, len(current), plan.max_model_len, align=64,
                               counts=fit.counts)
        lists[key] = tuple(planned)
        notes.append(f"{name} buckets planned from {len(fit)} observed lengths: padding "
                     f"{padding_ratio(fit.values, planned, fit.counts, fit.real):.3f} (powers "
                     f"of two: {padding_ratio(fit.values, current, fit.counts, fit.real):.3f})")
        if name == "prefill":
            cost = choose_cost(src, plan.max_model_len, device="neuron")
            notes.append(f"planned prefill buckets cost "
                         f"{relative_cost(cost, fit.values, planned, current, fit.counts):.3f}x "
                         f"of powers of two; cost model: {cost.source}")
        if len(fit) < len(lengths):
            notes.append(f"{len(lengths) - len(fit)} observed {name} lengths exceed "
                         f"--max-model-len {plan.max_model_len} and were left out")
    return replace(plan, notes=tuple(notes), **lists)


def read_shape(model: Path) -> ModelShape:
    """The :class:`ModelShape` of a model directory or ``config.json`` path."""
    path = model / "config.json" if model.is_dir() else model
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NeuronConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise NeuronConfigError(f"{path} does not hold a JSON object")
    name = path.resolve().parent.name or str(path)
    return ModelShape.from_config(config, name=str(config.get("_name_or_path") or name))


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        shape = read_shape(args.model)
        plan = recommend(shape, args.instance, dtype=args.dtype,
                         max_model_len=args.max_model_len, batch_size=args.max_num_seqs)
        if args.source:
            plan = plan_from_traffic(plan, args.source,
                                     args.api_key or os.environ.get("RAGSERVE_API_KEY"))
    except (NeuronConfigError, FileNotFoundError) as e:
        print(f"ragserve neuron plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, str(args.model)))
    return 0
