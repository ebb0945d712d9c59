"""Command line: ``spikelib calibrate|qfem|qfep|ppl|zeroshot|bench|models``. Each command prints one JSON object on stdout.

Logs and progress bars go to stderr, so stdout can be piped into ``jq`` or a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import bench, calibration, data, methods, models, perplexity, qfem, qfep, quantizers
from .hooks import TokenScales

METHODS = methods.METHODS


def _add_common(parser: argparse.ArgumentParser, windows_help: str | None, default_windows: int = 0) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="zoo short name, Hugging Face name, local folder or .gguf path (default: smollm2-135m)")
    parser.add_argument("--data-dir", default=None, help="local data mirror folder (default: $SPIKELIB_DATA_DIR, else the Hugging Face hub)")
    if windows_help is not None:
        parser.add_argument("--windows", type=int, default=default_windows, metavar="N", help=windows_help)
    parser.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per window (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window samplers (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES), help="model dtype (default: float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_calibration_source(parser: argparse.ArgumentParser, calib_windows_option: bool) -> None:
    parser.add_argument("--scales", default=None, help="token scales saved by `spikelib calibrate --output` (skips calibration)")
    if calib_windows_option:
        parser.add_argument("--calib-windows", type=int, default=32, help="C4 calibration windows for the token scales (when --scales is not given), SmoothQuant and static scales (default: 32)")


def _add_quantization_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--act-granularity", default="per-tensor", choices=quantizers.ACTIVATION_GRANULARITIES,
                        help="activation quantization: per-tensor dynamic, per-token dynamic, or per-tensor static "
                             "from calibrated maxima (default: per-tensor)")
    parser.add_argument("--sq-alpha", type=float, default=0.5,
                        help="SmoothQuant migration strength from 0 to 1, for the sq methods (default: 0.5)")
    parser.add_argument("--quantize-attention", action="store_true",
                        help="also fake-quantize the attention matmul inputs Q, K and V to INT8")


def _add_qfem_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=float, default=None, help="fixed QFeM threshold; without it alpha is searched")
    parser.add_argument("--search-windows", type=int, default=8, help="held-out C4 windows for the alpha search (default: 8)")
    parser.add_argument("--n-thresholds", type=int, default=12, help="alphas tried by the search (default: 12)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative perplexity tolerance of the alpha rule (default: 0.02)")


def _add_qfep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spike-candidates", type=int, default=8, help="candidate spike tokens (default: 8)")
    parser.add_argument("--context-candidates", type=int, default=64, help="candidate context tokens (default: 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikelib", description="Activation spikes, W8A8 fake quantization, QFeM and QFeP.")
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = commands.add_parser("calibrate", help="record token-wise input scales on C4 windows")
    _add_common(calibrate, "calibration windows (default: 32)", 32)
    calibrate.add_argument("--output", default=None, help="save the token scales to this .pt file")

    qfem_parser = commands.add_parser("qfem", help="compute r(m) and choose the QFeM modules")
    _add_common(qfem_parser, "calibration windows when --scales is not given (default: 32)", 32)
    _add_calibration_source(qfem_parser, calib_windows_option=False)
    _add_qfem_options(qfem_parser)

    qfep_parser = commands.add_parser("qfep", help="search the QFeP prefix")
    _add_common(qfep_parser, "calibration windows when --scales is not given (default: 32)", 32)
    _add_calibration_source(qfep_parser, calib_windows_option=False)
    _add_qfep_options(qfep_parser)

    ppl = commands.add_parser("ppl", help="WikiText-2 perplexity of one configuration")
    _add_common(ppl, "WikiText-2 test windows to evaluate; 0 for all (default: 16)", 16)
    ppl.add_argument("--method", default="fp", choices=METHODS, help="configuration to evaluate (default: fp)")
    _add_quantization_options(ppl)
    _add_calibration_source(ppl, calib_windows_option=True)
    _add_qfem_options(ppl)
    _add_qfep_options(ppl)
    zeroshot_parser = commands.add_parser("zeroshot", help="zero-shot accuracy with lm-evaluation-harness")
    _add_common(zeroshot_parser, windows_help=None)
    zeroshot_parser.add_argument("--method", default="fp", choices=METHODS, help="configuration to evaluate (default: fp)")
    zeroshot_parser.add_argument("--tasks", type=_task_list, default=list(ZEROSHOT_TASKS),
                                 help=f"comma-separated tasks from {','.join(ZEROSHOT_TASKS)},wikitext (default: the first seven)")
    zeroshot_parser.add_argument("--limit", type=int, default=None, metavar="N",
                                 help="evaluate the first N documents of each task, as lm-eval's --limit does")
    zeroshot_parser.add_argument("--docs", type=int, default=None, metavar="N",
                                 help="evaluate N documents per task drawn with --seed (the same for every method)")
    zeroshot_parser.add_argument("--batch-size", type=int, default=8, help="log-likelihood requests per forward pass (default: 8)")
    zeroshot_parser.add_argument("--max-length", type=int, default=None,
                                 help="maximum sequence length of the harness's requests, in tokens (default: the model's maximum)")
    _add_quantization_options(zeroshot_parser)
    _add_calibration_source(zeroshot_parser, calib_windows_option=True)
    _add_qfem_options(zeroshot_parser)
    _add_qfep_options(zeroshot_parser)

    bench_parser = commands.add_parser("bench", help="prefill latency and peak memory of the INT8 path, method by method")
    _add_common(bench_parser, windows_help=None)
    bench_parser.set_defaults(seq_len=1024)
    bench_parser.add_argument("--methods", type=_bench_methods, default=list(BENCH_METHODS),
                              help=f"comma-separated methods from {','.join(BENCH_METHODS)} (default: all)")
    bench_parser.add_argument("--repeats", type=int, default=5, help="timed passes per method; the median is reported (default: 5)")
    bench_parser.add_argument("--act-granularity", default="per-tensor", choices=("per-tensor", "per-token"),
                              help="dynamic activation scales of the INT8 layers (default: per-tensor)")
    bench_parser.add_argument("--plan", default=None, help="quantization plan JSON (--save-plan writes one); without it QFeM and QFeP are searched")
    bench_parser.add_argument("--save-plan", default=None, metavar="FILE",
                              help="write the QFeM modules and QFeP prefix used here as a quantization plan JSON")
    bench_parser.add_argument("--sdpa-attention", action="store_true",
                              help="keep transformers' SDPA attention with its full mask behind the prefix "
                                   "(default: spikelib.prefix_attention, the same output, faster)")
    _add_calibration_source(bench_parser, calib_windows_option=True)
    _add_qfem_options(bench_parser)
    _add_qfep_options(bench_parser)

    listing = commands.add_parser("models", help="list the zoo models and the supported architecture families")
    listing.set_defaults(no_progress=True, data_dir=None, seq_len=2)
    return parser


BENCH_METHODS = bench.METHODS


def _bench_methods(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no methods given; choose from {','.join(BENCH_METHODS)}")
    unknown = [name for name in names if name not in BENCH_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"invalid method(s) {unknown}; choose from {','.join(BENCH_METHODS)}")
    return list(dict.fromkeys(names))


# The zero-shot task names, kept here so that `--help` works without importing lm-eval.
ZEROSHOT_TASKS = ("piqa", "lambada_openai", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq")
ZEROSHOT_CHOICES = ZEROSHOT_TASKS + ("wikitext",)


def _task_list(value: str) -> list[str]:
    tasks = [task.strip() for task in value.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in ZEROSHOT_CHOICES]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"invalid task(s) {unknown or value!r}; choose from {','.join(ZEROSHOT_CHOICES)}")
    return tasks


def _load(args):
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=args.dtype)
    return model, tokenizer, models.start_token_id(tokenizer)


def _scales(args, model, tokenizer, start_id, n_windows: int) -> TokenScales:
    if getattr(args, "scales", None):
        return TokenScales.load(args.scales)
    documents = data.c4_documents("train", args.data_dir)
    windows = calibration.sample_windows(tokenizer, documents, n_windows, args.seq_len, start_id, args.seed)
    return calibration.calibrate(model, windows, progress=not args.no_progress)


def _qfem_selection(args, model, tokenizer, start_id, scales, quantized) -> dict[str, Any]:
    ratios = qfem.module_ratios(scales)
    if args.alpha is not None:
        modules = qfem.select_modules(ratios, args.alpha, scales.module_sites)
        quantizers.set_full_precision_inputs(quantized, modules)
        return {"alpha": args.alpha, "modules": modules, "n_modules": len(modules), "searched": False}

    documents = data.c4_documents("validation", args.data_dir)
    held_out = calibration.sample_windows(tokenizer, documents, args.search_windows, args.seq_len + 1, start_id, args.seed)[:, 1:]

    def evaluate(candidate):
        return perplexity.evaluate_perplexity(candidate, held_out, start_id, progress=False).ppl

    alphas = qfem.threshold_grid(ratios, args.n_thresholds)
    search = qfem.search_threshold(
        quantized, ratios, scales.module_sites, alphas, evaluate, args.tolerance, progress=not args.no_progress
    )
    result = search.to_dict()
    return {"alpha": result["alpha"], "modules": search.modules, "n_modules": len(search.modules), "searched": True,
            "rule": search.rule, "tradeoff": result["points"]}


def _prefix_search(args, model, tokenizer, start_id, scales) -> qfep.PrefixSearch:
    return qfep.search_prefix(
        model, tokenizer, scales, qfem.module_ratios(scales), start_id,
        args.spike_candidates, args.context_candidates, progress=not args.no_progress,
    )


def run_calibrate(args) -> dict[str, Any]:
    model, tokenizer, start_id = _load(args)
    scales = _scales(args, model, tokenizer, start_id, args.windows)
    scales.metadata.update({"model_name": args.model, "seed": args.seed})
    if args.output:
        scales.save(args.output)
    ratios = qfem.site_ratios(scales)
    maxima = scales.site_max()
    top = sorted(ratios, key=ratios.get, reverse=True)[:5]
    return {
        "model": args.model,
        "n_tokens": int(scales.token_ids.numel()),
        "top_sites": [{"site": site, "ratio": ratios[site], "max": maxima[site]} for site in top],
        "down_proj_max": {site: maxima[site] for site in maxima if site.endswith("down_proj")},
        "output": args.output,
    }


def run_qfem(args) -> dict[str, Any]:
    model, tokenizer, start_id = _load(args)
    scales = _scales(args, model, tokenizer, start_id, args.windows)
    quantized = quantizers.quantize_model(model)
    selection = _qfem_selection(args, model, tokenizer, start_id, scales, quantized)
    ratios = qfem.site_ratios(scales)
    top = sorted(ratios, key=ratios.get, reverse=True)[:10]
    return {"model": args.model, **selection, "top_site_ratios": {site: ratios[site] for site in top}}


def run_qfep(args) -> dict[str, Any]:
    model, tokenizer, start_id = _load(args)
    scales = _scales(args, model, tokenizer, start_id, args.windows)
    return {"model": args.model, **_prefix_search(args, model, tokenizer, start_id, scales).to_dict()}


def _build_configuration(args, model, tokenizer, start_id, report: dict[str, Any]) -> methods.Configuration:
    """Build ``args.method`` (QFeM and QFeP searched unless given), recording the choices in ``report``."""
    method = methods.Method.parse(args.method)
    if method.quantize:
        report["act_granularity"] = args.act_granularity

    qfem_modules, prefix_ids = [], None
    if method.qfem or method.qfep:
        scales = _scales(args, model, tokenizer, start_id, args.calib_windows)
    if method.qfem:
        # The threshold is chosen on plain per-tensor W8A8; every qfem method reuses its modules.
        selection = _qfem_selection(args, model, tokenizer, start_id, scales, quantizers.quantize_model(model))
        qfem_modules = selection["modules"]
        report.update({"alpha": selection["alpha"], "n_fp_modules": selection["n_modules"], "fp_modules": qfem_modules})
    if method.qfep:
        search = _prefix_search(args, model, tokenizer, start_id, scales)
        prefix_ids = search.prefix_ids
        report.update({"prefix_ids": search.prefix_ids, "prefix_tokens": search.prefix_tokens})

    calibration_windows = None
    if method.smooth or (method.quantize and args.act_granularity == "static"):
        documents = data.c4_documents("train", args.data_dir)
        calibration_windows = calibration.sample_windows(tokenizer, documents, args.calib_windows, args.seq_len, start_id, args.seed)
    builder = methods.ConfigurationBuilder(model, calibration_windows, qfem_modules, prefix_ids, args.sq_alpha,
                                           progress=not args.no_progress)
    configuration = builder.build(method, args.act_granularity, args.quantize_attention)
    if method.smooth:
        report["sq_alpha"] = args.sq_alpha
    if args.quantize_attention:
        report["quantized_attention"] = True
    return configuration


def run_ppl(args) -> dict[str, Any]:
    model, tokenizer, start_id = _load(args)
    test_ids = tokenizer(data.wikitext2_test_text(args.data_dir), add_special_tokens=False)["input_ids"]
    windows = perplexity.split_windows(test_ids, args.seq_len, args.windows or None)
    report: dict[str, Any] = {"model": args.model, "method": args.method, "seq_len": args.seq_len}
    configuration = _build_configuration(args, model, tokenizer, start_id, report)
    result = methods.evaluate(configuration, windows, start_id, progress=not args.no_progress, description=args.method)
    report.update(result.to_dict())
    return report


def run_zeroshot(args) -> dict[str, Any]:
    from . import zeroshot  # imports lm-evaluation-harness, which takes a few seconds

    model, tokenizer, start_id = _load(args)
    report: dict[str, Any] = {"model": args.model, "method": args.method}
    configuration = _build_configuration(args, model, tokenizer, start_id, report)
    # The harness prints some progress lines to stdout; they go to stderr so that stdout stays one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        result = zeroshot.evaluate_zeroshot(
            configuration.model, tokenizer, args.tasks, args.data_dir, configuration.prefix, start_id,
            limit=args.limit, n_docs=args.docs, seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
        )
    report.update(result.to_dict())
    return report


def _check_task_files(mirror: Path, tasks: list[str]) -> None:
    """Raise FileNotFoundError for the first task whose file the mirror lacks, before any model loads."""
    from .zeroshot import SOURCES

    for task in tasks:
        path = mirror / SOURCES[task].mirror_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; the data mirror needs {SOURCES[task].mirror_file} for task {task}")


def _check_arguments(args) -> str | None:
    """Return a message for the first invalid argument, before anything slow runs."""
    minimum_windows = 0 if args.command == "ppl" else 1
    if getattr(args, "windows", minimum_windows) < minimum_windows:
        return f"--windows must be at least {minimum_windows}, got {args.windows}"
    if args.seq_len < 2:
        return f"--seq-len must be at least 2 (a start token and one scored token), got {args.seq_len}"
    if getattr(args, "calib_windows", 1) < 1:
        return f"--calib-windows must be at least 1, got {args.calib_windows}"
    configures = args.command in ("ppl", "zeroshot")
    if configures and not 0.0 <= args.sq_alpha <= 1.0:
        return f"--sq-alpha must be from 0 to 1, got {args.sq_alpha}"
    if configures and args.method == "fp" and args.quantize_attention:
        return "--quantize-attention needs a quantized method; pick one starting with w8a8"
    if args.command == "zeroshot":
        if args.limit is not None and args.docs is not None:
            return "--limit and --docs both choose documents; give only one"
        for option, value in (("--limit", args.limit), ("--docs", args.docs), ("--batch-size", args.batch_size)):
            if value is not None and value < 1:
                return f"{option} must be at least 1, got {value}"
    if args.command == "bench":
        if args.repeats < 1:
            return f"--repeats must be at least 1, got {args.repeats}"
        if args.plan and Path(args.plan).is_dir():
            return f"--plan {args.plan} is a folder; give a plan file, such as results/int8/plans/smollm2-135m.json"
        if args.plan and not Path(args.plan).is_file():
            return f"--plan file not found: {args.plan}; write one with --save-plan FILE"
        if args.save_plan:
            target = Path(args.save_plan)
            if target.is_dir():
                return f"--save-plan {target} is a folder; give a file name such as {target / 'plan.json'}"
            existing = next(folder for folder in (target.parent.resolve(), *target.parent.resolve().parents) if folder.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK):
                return f"--save-plan: cannot write under {existing}; choose a writable folder"
    scales = getattr(args, "scales", None)
    if scales and configures and "qfem" not in args.method and "qfep" not in args.method:
        return f"--scales is not used by --method {args.method}; drop it or pick a method with qfem or qfep"
    if scales and not Path(scales).is_file():
        return f"--scales file not found: {scales}; write one with `spikelib calibrate --output FILE`"
    return None


def run_bench(args) -> dict[str, Any]:
    """Time the prefill of each method on the INT8 path (FP32 stays in float) and report its memory."""
    import torch

    from . import plan

    model, tokenizer, start_id = _load(args)
    report: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "repeats": args.repeats, "device": args.device,
                              "threads": torch.get_num_threads(), "act_granularity": args.act_granularity}
    qfem_modules, prefix_ids, input_absmax = [], None, {}
    parsed = [bench.BenchMethod.parse(name).method for name in args.methods]
    if args.plan:
        loaded = plan.QuantizationPlan.load(args.plan)
        if loaded.model_name != args.model:
            raise ValueError(f"{args.plan} is a plan for {loaded.model_name}, not {args.model}; "
                             f"pass --model {loaded.model_name} or a plan made for {args.model}")
        loaded.check_model(model)
        if any(method.qfem for method in parsed) and not methods.Method.parse(loaded.method).qfem:
            raise ValueError(f"{args.plan} has no QFeM selection (method {loaded.method}); "
                             "drop the qfem methods or use a plan made with qfem")
        qfem_modules, prefix_ids, input_absmax = loaded.full_precision_modules, loaded.prefix_ids, loaded.input_absmax
        report.update({"plan": args.plan, "fp_modules": qfem_modules, "prefix_ids": prefix_ids})
    elif any(method.qfem or method.qfep for method in parsed):
        scales = _scales(args, model, tokenizer, start_id, args.calib_windows)
        input_absmax = plan.input_absmax_from_scales(scales)
        if any(method.qfem for method in parsed):
            selection = _qfem_selection(args, model, tokenizer, start_id, scales, quantizers.quantize_model(model))
            qfem_modules = selection["modules"]
            report.update({"alpha": selection["alpha"], "fp_modules": qfem_modules})
        if any(method.qfep for method in parsed):
            search = _prefix_search(args, model, tokenizer, start_id, scales)
            prefix_ids = search.prefix_ids
            report.update({"prefix_ids": search.prefix_ids, "prefix_tokens": search.prefix_tokens})
    if any(method.qfep for method in parsed) and not prefix_ids:
        raise ValueError(f"{args.plan} has no QFeP prefix; drop the qfep methods or use a plan made with one")
    if args.save_plan and args.plan:
        report["saved_plan"] = str(loaded.save(args.save_plan))  # the loaded plan, whole
    elif args.save_plan:
        name = "+".join(["w8a8"] + [part for part, used in (("qfem", any(m.qfem for m in parsed)), ("qfep", bool(prefix_ids))) if used])
        chosen = plan.plan_from_choices(args.model, name, qfem_modules, prefix_ids, tokenizer, input_absmax,
                                        alpha=report.get("alpha"), act_granularity=args.act_granularity)
        report["saved_plan"] = str(chosen.save(args.save_plan))

    report["attention"] = "sdpa" if args.sdpa_attention else "spikelib_prefix"
    runners, details = bench.build_runners(model, args.methods, qfem_modules, prefix_ids, args.act_granularity,
                                           fast_prefix_attention=not args.sdpa_attention)
    results = bench.prefill(runners, args.seq_len, model.config.vocab_size, args.repeats, args.device, args.seed)
    for name, result in results.items():
        result.update(details[name])
        result["peak_memory_mb"] = round(details[name]["model_mb"] + result["pass_memory_mb"], 1)
    report["methods"] = results
    return report


def run_models(args) -> dict[str, Any]:
    """Return the zoo entries and the architecture table; nothing is loaded or downloaded."""
    from . import architectures

    cache = models.default_cache_dir() / "models"
    zoo = [{"name": entry.short_name, "description": entry.description, "wheels": len(entry.parts),
            "file": entry.filename, "sha256": entry.sha256,
            "cached": (cache / entry.short_name / entry.filename).is_file()} for entry in models.ZOO.values()]
    return {"zoo": zoo, "families": architectures.describe_families(), "cache": str(cache)}


COMMANDS = {"calibrate": run_calibrate, "qfem": run_qfem, "qfep": run_qfep, "ppl": run_ppl, "zeroshot": run_zeroshot,
            "bench": run_bench, "models": run_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_arguments(args)
    if problem:
        print(f"spikelib {args.command}: error: {problem}", file=sys.stderr)
        return 2
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        mirror = data.resolve_data_dir(args.data_dir)  # fail before the model loads
        if args.command == "zeroshot" and mirror is not None:
            _check_task_files(mirror, args.tasks)
        report = COMMANDS[args.command](args)
    except (data.DataUnavailableError, models.ModelDownloadError, models.ChecksumMismatchError,
            models.ModelNotFoundError, models.ActivationOverflowError, FileNotFoundError, ValueError, KeyError) as error:
        print(f"spikelib {args.command}: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, default=_json_value))
    return 0


def _json_value(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
