"""Compare ``spikelib zeroshot`` with lm-evaluation-harness's own command line on the FP32 model.

Both run as child processes with the same thread settings on the first ``--limit`` documents of
each task, and the script prints each metric side by side with the largest difference. Not a
test (the test suite checks 6 documents per task); use it to check a larger sample.

Usage: python benchmarks/compare_lm_eval.py [--limit 100] [--tasks piqa,lambada_openai,hellaswag,winogrande]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spikelib import models, zeroshot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo short name (its GGUF file is passed to lm-eval)")
    parser.add_argument("--data-dir", default=os.environ.get("SPIKELIB_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tasks", default=",".join(zeroshot.PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=100, help="first documents of each task (default: 100)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    tasks = args.tasks.split(",")
    gguf = models.zoo_gguf_path(args.model)
    binary = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), SPIKELIB_DATA_DIR=args.data_dir,
               HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch:
        folder = zeroshot.write_task_configs(args.data_dir, Path(scratch) / "tasks", tasks)
        ours = subprocess.run([str(binary / "spikelib"), "zeroshot", "--model", args.model, "--method", "fp", "--tasks",
                               args.tasks, "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--no-progress"],
                              capture_output=True, text=True, env=env, check=True)
        output = Path(scratch) / "harness"
        subprocess.run([str(binary / "lm_eval"), "run", "--model", "hf", "--model_args",
                        f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", "--tasks", *tasks,
                        "--limit", str(args.limit), "--batch_size", str(args.batch_size), "--include_path", str(folder),
                        "--output_path", str(output), "--device", "cpu"], capture_output=True, text=True, env=env, check=True)
        harness = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    mine = json.loads(ours.stdout)["tasks"]

    largest = 0.0
    print(f"{'task':16s} {'metric':12s} {'spikelib':>12s} {'lm_eval':>12s}")
    for task in tasks:
        for metric in ("acc", "acc_norm", "perplexity"):
            key = f"{metric},none"
            if key in harness[task]:
                largest = max(largest, abs(mine[task][metric] - harness[task][key]))
                print(f"{task:16s} {metric:12s} {mine[task][metric]:12.6f} {harness[task][key]:12.6f}")
    print(f"largest absolute difference: {largest:.3g} over {args.limit} documents per task")


if __name__ == "__main__":
    main()
