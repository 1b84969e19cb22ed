"""``ragserve neuron plan``: size a model for an Inferentia2/Trainium instance from its config.json.

Reads only ``config.json`` (no weights, no torch, no Neuron packages) and prints the HBM budget
per NeuronCore and a ``ragserve serve`` line; exits 2 with the reason when the model cannot fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.neuron_plan import INSTANCES, ModelShape, NeuronConfigError, format_plan, recommend


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
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)


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
    except (NeuronConfigError, FileNotFoundError) as e:
        print(f"ragserve neuron plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, str(args.model)))
    return 0
