"""Prefill latency and memory of real INT8 inference, method by method. Prints tables; not a test.

For each model it times FP32, W8A8, W8A8+QFeM, W8A8+QFeP and W8A8+QFeM+QFeP on spikelib's INT8
path, and torchao's int8 dynamic-activation, int8-weight configuration with and without the same
QFeM modules and prefix. All run in one process and take turns; each reports the median of
--repeats timed passes after a warm-up.
The QFeM modules and prefix come from quantization plans: --plan FILE for one model, else the plan
that the ``int8_cost`` stage exported to ``results/int8/plans/`` (committed), else the choices of
the last pipeline run in ``results/``.

Usage: python benchmarks/int8_cost.py [--models smollm2-135m,qwen2.5-0.5b] [--seq-lens 128,256,512,1024,2048]
                                      [--repeats 3] [--summary-seq-len 1024] [--plan FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spikelib import bench, cost, plan  # noqa: E402
from spikelib.artifacts import slug  # noqa: E402


def _names(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def plan_for(model_name: str, plan_path: str | None) -> plan.QuantizationPlan:
    """Return ``plan_path``'s plan, else the stage's exported plan of the model, else one built from ``results/``."""
    if plan_path:
        return plan.QuantizationPlan.load(plan_path)
    exported = ROOT / "results" / "int8" / "plans" / f"{slug(model_name)}.json"
    if exported.is_file():
        return plan.QuantizationPlan.load(exported)
    main_model = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["name"]
    return plan.plan_from_results(model_name, main_model, ROOT / "results")


def _lengths(value: str) -> list[int]:
    try:
        return [int(item) for item in _names(value)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid --seq-lens {value!r}: give comma-separated token counts") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_names, default=["smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--seq-lens", type=_lengths,
                        default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--methods", type=_names, default=list(bench.METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--summary-seq-len", type=int, default=1024)
    parser.add_argument("--act-granularity", default="per-tensor", choices=("per-tensor", "per-token"))
    parser.add_argument("--plan", default=None, help="quantization plan JSON, for a single --models entry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if args.plan and len(args.models) != 1:
        parser.error("--plan is one model's plan; give a single --models entry with it")
    if args.summary_seq_len not in args.seq_lens:
        parser.error(f"--summary-seq-len {args.summary_seq_len} is not one of --seq-lens {args.seq_lens}")
    if not args.models:
        parser.error("--models is empty; give at least one model name")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if min(args.seq_lens) < 1:
        parser.error(f"--seq-lens must be positive, got {args.seq_lens}")
    unknown = [name for name in args.methods if name not in bench.METHODS]
    if unknown or not args.methods:
        parser.error(f"invalid --methods {unknown or args.methods}; choose from {','.join(bench.METHODS)}")
    plans = {}
    for name in args.models:
        try:
            plans[name] = plan_for(name, args.plan)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"no quantization plan for {name}: {error}")

    rows = []
    for name in args.models:
        chosen = plans[name]
        chosen.act_granularity = args.act_granularity
        rows += cost.measure_model(name, chosen, args.seq_lens, args.methods, args.repeats, args.device,
                                   act_granularity=args.act_granularity)
    frame = pd.DataFrame(rows)
    print(f"{torch.get_num_threads()} threads; median of {args.repeats} timed passes after one warm-up\n")
    print("prefill latency (ms)")
    print(frame.pivot_table(index=["model", "seq_len"], columns="method", values="prefill_ms", sort=False).round(0).to_string())
    print("\npeak memory (MB: model + one pass)")
    print(frame.pivot_table(index=["model", "seq_len"], columns="method", values="peak_memory_mb", sort=False).round(0).to_string())
    print(f"\nsummary at {args.summary_seq_len} tokens")
    print(cost.summary(frame, args.summary_seq_len).drop(columns=["activation"]).to_string(index=False))
    if args.json:
        from spikelib.artifacts import write_json

        write_json(args.json, {"rows": rows, "threads": torch.get_num_threads(), "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
