"""Benchmarks of the main job. Prints a table and one JSON object; not a test.

Measures, side by side in one run (median of several repeats after a warm-up):
- the hooks' overhead: forward passes with the scale-recording hooks over plain forward passes;
- fake-quantized evaluation time over full precision (W8A8 per-tensor perplexity vs FP32);
- peak resident memory of calibration, in a child process, against a child that only loads the model;
- with --zeroshot, lm-evaluation-harness time per 1,000 log-likelihood requests for FP32, W8A8 and
  W8A8+QFeP on the same documents, and the per-configuration wall times the last default
  pipeline run recorded in results/main/zeroshot.json;
- with --zoo, for every zoo model in its own child process: load time, calibration time
  (4 windows), FP32 and W8A8 evaluation time (2 windows) and the child's peak resident memory;
- with --pipeline, the wall time of the whole default ``dvc repro`` in a scratch copy of the repository.

Usage: python benchmarks/run_benchmarks.py [--model smollm2-135m] [--repeats 5] [--zeroshot] [--zoo] [--pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spikelib import calibration, data, models, perplexity, quantizers  # noqa: E402
from spikelib.hooks import record_token_scales  # noqa: E402


def paired_medians(first, second, repeats: int) -> tuple[float, float]:
    """Time two callables alternately after one warm-up call each and return their median seconds."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for index, function in enumerate((first, second)):
            start = time.perf_counter()
            function()
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def hook_overhead(model, windows, repeats: int) -> dict:
    def plain():
        model(input_ids=windows, use_cache=False)

    def hooked():
        with record_token_scales(model):
            model(input_ids=windows, use_cache=False)

    base, with_hooks = paired_medians(plain, hooked, repeats)
    return {"plain_s": base, "hooked_s": with_hooks, "overhead": with_hooks / base - 1}


def fake_quant_overhead(model, start_id, windows, repeats: int) -> dict:
    quantized = quantizers.quantize_model(model)

    def full_precision():
        perplexity.evaluate_perplexity(model, windows, start_id, progress=False)

    def fake_quantized():
        perplexity.evaluate_perplexity(quantized, windows, start_id, progress=False)

    base, quant = paired_medians(full_precision, fake_quantized, repeats)
    return {"fp32_s": base, "w8a8_s": quant, "overhead": quant / base - 1}


CHILD = """
import json, sys, threading, time
import psutil
from spikelib import calibration, data, models

process = psutil.Process()
model, tokenizer = models.load_model(sys.argv[1])
start = models.start_token_id(tokenizer)
windows = calibration.sample_windows(tokenizer, data.c4_documents("train", sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), start, 0)
baseline = process.memory_info().rss
peak = [baseline]
done = threading.Event()

def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], process.memory_info().rss)

sampler = threading.Thread(target=sample)
sampler.start()
scales = calibration.calibrate(model, windows, progress=False)
done.set()
sampler.join()
stored = sum(values.numel() * values.element_size() for values in scales.scales.values())
print(json.dumps({"before_mb": baseline / 2**20, "peak_mb": peak[0] / 2**20, "scales_mb": stored / 2**20}))
"""


def calibration_memory(model_name: str, data_dir: str, n_windows: int, seq_len: int) -> dict:
    """Run calibration in a child process and sample its resident memory every 20 ms.

    Returns the RSS before calibration (model loaded, windows sampled), the peak during it, and the
    size of the recorded scales.
    """
    command = [sys.executable, "-c", CHILD, model_name, data_dir, str(n_windows), str(seq_len)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {**measured, "extra_mb": measured["peak_mb"] - measured["before_mb"], "n_windows": n_windows, "seq_len": seq_len}


ZOO_CHILD = """
import json, sys, time
from spikelib import calibration, data, models, perplexity, quantizers
name, data_dir, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = {}
start = time.perf_counter()
model, tokenizer = models.load_model(name)
times["load_s"] = time.perf_counter() - start
start_id = models.start_token_id(tokenizer)
windows = calibration.sample_windows(tokenizer, data.c4_documents("train", data_dir), 4, seq_len, start_id, 0)
start = time.perf_counter()
calibration.calibrate(model, windows, batch_size=2, progress=False)
times["calibration_4_windows_s"] = time.perf_counter() - start
test_ids = tokenizer(data.wikitext2_test_text(data_dir), add_special_tokens=False)["input_ids"]
test = perplexity.split_windows(test_ids, seq_len, 2)
for label, candidate in (("fp32", model), ("w8a8", quantizers.quantize_model(model))):
    start = time.perf_counter()
    result = perplexity.evaluate_perplexity(candidate, test, start_id, progress=False)
    times[f"{label}_2_windows_s"] = time.perf_counter() - start
    times[f"{label}_ppl"] = result.ppl
print(json.dumps(times))
"""


def zoo_costs(data_dir: str, seq_len: int) -> list[dict]:
    """Load, calibrate and evaluate each zoo model in its own child process; report times and peak RSS."""
    rows = []
    for name in models.ZOO:
        models.zoo_gguf_path(name)  # download outside the timed child
        child = subprocess.Popen([sys.executable, "-c", ZOO_CHILD, name, data_dir, str(seq_len)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        start = time.perf_counter()
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"zoo benchmark of {name} failed with exit code {child.returncode}")
        rows.append({"model": name, "wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
                     **json.loads(output.strip().splitlines()[-1])})
    return rows


def pipeline_wall_time(data_dir: str) -> dict:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    with tempfile.TemporaryDirectory(prefix="spikelib-bench-") as scratch:
        copy = Path(scratch)
        for relative in listed:
            if (ROOT / relative).is_file() and not relative.startswith(("results/", "figures/")):
                (copy / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, copy / relative)
        subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
        params = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
        params["data"]["dir"] = str(Path(data_dir).resolve())
        (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=copy, env=env, check=True, capture_output=True)
        return {"default_dvc_repro_s": time.perf_counter() - start}


def zeroshot_speed(model, tokenizer, start_id, data_dir: str, repeats: int, n_docs: int = 20) -> dict:
    """Time lm-eval on the same PIQA and HellaSwag documents for three configurations, interleaved."""
    from spikelib import qfep, zeroshot

    quantized = quantizers.quantize_model(model)
    # The prefix only has to be a real three-token prefix here; its effect on accuracy is not measured.
    prefix = qfep.PrefixCache(model, [start_id, *tokenizer(" the.", add_special_tokens=False)["input_ids"][:2]])
    configurations = {"FP32": (model, None), "W8A8": (quantized, None), "W8A8+QFeP": (quantized, prefix)}
    times: dict[str, list[float]] = {name: [] for name in configurations}
    requests = 0
    for repeat in range(repeats + 1):
        for name, (evaluated, cache) in configurations.items():
            result = zeroshot.evaluate_zeroshot(evaluated, tokenizer, ["piqa", "hellaswag"], data_dir, cache, start_id,
                                                n_docs=n_docs, seed=0)
            requests = result.loglikelihood_requests
            if repeat:  # the first round is the warm-up
                times[name].append(result.seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    recorded = ROOT / "results" / "main" / "zeroshot.json"
    pipeline = json.loads(recorded.read_text())["summary"] if recorded.is_file() else []
    return {
        "requests": requests,
        "seconds_per_1000_requests": {name: 1000 * value / requests for name, value in medians.items()},
        "ratio_to_fp32": {name: value / medians["FP32"] for name, value in medians.items()},
        "pipeline_default_subset": pipeline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("SPIKELIB_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--zeroshot", action="store_true", help="also time lm-eval requests per configuration (about 5 minutes)")
    parser.add_argument("--zoo", action="store_true", help="also time and measure every zoo model (about 6 minutes)")
    parser.add_argument("--pipeline", action="store_true", help="also time the whole default dvc repro (about 60 minutes)")
    args = parser.parse_args()

    model, tokenizer = models.load_model(args.model)
    start_id = models.start_token_id(tokenizer)
    documents = data.c4_documents("train", args.data_dir)
    windows = calibration.sample_windows(tokenizer, documents, 4, args.seq_len, start_id, 0)
    test_ids = tokenizer(data.wikitext2_test_text(args.data_dir), add_special_tokens=False)["input_ids"]
    test_windows = perplexity.split_windows(test_ids, args.seq_len, 4)

    report = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "hooks": hook_overhead(model, windows, args.repeats),
        "fake_quant_eval": fake_quant_overhead(model, start_id, test_windows, args.repeats),
        "calibration_memory": calibration_memory(args.model, args.data_dir, 64, args.seq_len),
    }
    if args.zeroshot:
        report["zeroshot"] = zeroshot_speed(model, tokenizer, start_id, args.data_dir, min(args.repeats, 3))
    if args.zoo:
        report["zoo"] = zoo_costs(args.data_dir, args.seq_len)
    if args.pipeline:
        report["pipeline"] = pipeline_wall_time(args.data_dir)

    print(f"hooks overhead over a plain forward pass: {report['hooks']['overhead']:+.1%} (target < 10%)")
    print(f"fake-quantized W8A8 evaluation over FP32: {report['fake_quant_eval']['overhead']:+.1%} (target < 15%)")
    memory = report["calibration_memory"]
    print(f"calibration of {memory['n_windows']} x {memory['seq_len']} tokens: RSS {memory['before_mb']:.0f} MB before, "
          f"peak {memory['peak_mb']:.0f} MB during (+{memory['extra_mb']:.0f} MB); recorded scales {memory['scales_mb']:.1f} MB")
    if args.zeroshot:
        speed = report["zeroshot"]
        for name, seconds in speed["seconds_per_1000_requests"].items():
            print(f"lm-eval {name}: {seconds:.0f} s per 1,000 log-likelihood requests "
                  f"({speed['ratio_to_fp32'][name]:.2f} x FP32; {speed['requests']} requests per run)")
        for item in speed["pipeline_default_subset"]:
            print(f"default zero-shot subset, {item['method']}: {item['seconds']:.0f} s for {item['loglikelihood_requests']} "
                  f"requests and {item['rolling_documents']} rolling articles (last pipeline run)")
    if args.zoo:
        for row in report["zoo"]:
            print(f"{row['model']:>13}: peak RSS {row['peak_rss_mb']:6.0f} MB, wall {row['wall_s']:5.1f} s (load {row['load_s']:.1f} s, "
                  f"calibration of 4 x {args.seq_len} tokens {row['calibration_4_windows_s']:.1f} s, 2 windows FP32 "
                  f"{row['fp32_2_windows_s']:.1f} s, W8A8 {row['w8a8_2_windows_s']:.1f} s)")
    if args.pipeline:
        print(f"default dvc repro: {report['pipeline']['default_dvc_repro_s'] / 60:.1f} min (target < 60 min)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
