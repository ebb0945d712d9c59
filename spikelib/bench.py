"""Prefill latency and peak memory of several configurations, measured side by side.

Each method runs a batch of one sequence of ``seq_len`` random tokens (with its prefix cache in
front for QFeP methods). A pass is the prefill of generation: every method builds the KV cache,
and only the last position's logits are computed where the model accepts ``logits_to_keep``.
After one warm-up pass per method, the timed passes go round-robin over the methods, so that a
slow spell of a shared machine touches all of them. The median is reported.

Memory per method is what its model stores (parameters and buffers) plus what one pass adds:
on CPU the rise of the process's resident set size, sampled every 5 ms during the method's
warm-up pass, after freed heap memory was handed back to the system. On CUDA it is
``torch.cuda.max_memory_allocated`` over that pass. All methods live in one process, so the
process's own peak is not a per-method figure.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from . import int8, methods


@dataclass
class Runner:
    """One method: its model and an optional prefix cache (``spikelib.qfep.PrefixCache``)."""

    model: nn.Module
    prefix: object | None = None

    def __post_init__(self) -> None:
        accepted = inspect.signature(self.model.forward).parameters
        self.options = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> None:
        if self.prefix is None:
            self.model(input_ids=input_ids, use_cache=True, **self.options)
        else:
            self.model(input_ids=input_ids, **self.prefix.forward_kwargs(), **self.options)


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``), so a later RSS rise is new memory.

    Without it, memory freed by one method's pass is reused by the next one, whose rise then
    looks smaller than it is. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def model_bytes(model: nn.Module) -> int:
    """Return the bytes of a model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += int8.tensor_bytes(tensor)
    return total


class PeakRss:
    """Context manager that samples the process's resident set size in a thread and keeps the peak."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.before = self.peak = 0
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        release_free_memory()
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.before) / 2**20


def prefill(
    runners: dict[str, Callable[[torch.Tensor], None]],
    seq_len: int,
    vocab_size: int,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, dict]:
    """Return, per method, the median prefill latency in ms, every timed run, and the memory one pass adds in MB."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, seq_len), generator=generator).to(device)
    cuda = device.type == "cuda"

    def timed(runner) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        runner(input_ids)
        if cuda:
            torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - started)

    memory: dict[str, float] = {}
    for name, runner in runners.items():  # warm-up, and one pass that measures memory alone
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            runner(input_ids)
            memory[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            with PeakRss() as rss:
                runner(input_ids)
            memory[name] = rss.extra_mb
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name].append(timed(runner))
    return {
        name: {"prefill_ms": round(statistics.median(values), 2), "runs_ms": [round(v, 2) for v in values],
               "pass_memory_mb": round(memory[name], 1)}
        for name, values in times.items()
    }


TORCHAO = "torchao"
METHODS = ("fp", "w8a8", "w8a8+qfem", "w8a8+qfep", "w8a8+qfem+qfep", "torchao", "torchao+qfem+qfep")


@dataclass(frozen=True)
class BenchMethod:
    """A method of the benchmark: a spikelib configuration, run on the INT8 path or by torchao.

    ``torchao`` is torchao's int8 dynamic-activation (per token), int8-weight (per channel)
    configuration. ``torchao+qfem+qfep`` also leaves the QFeM modules unquantized and puts the
    QFeP prefix cache in front.
    """

    name: str
    engine: str
    method: methods.Method

    @classmethod
    def parse(cls, name: str) -> "BenchMethod":
        canonical = name.strip().lower()
        if canonical not in METHODS:
            raise ValueError(f"unknown benchmark method {name!r}; choose from {','.join(METHODS)}")
        if canonical.startswith(TORCHAO):
            return cls(canonical, TORCHAO, methods.Method.parse("w8a8" + canonical[len(TORCHAO):]))
        parsed = methods.Method.parse(canonical)
        return cls(canonical, "int8" if parsed.quantize else "float", parsed)

    @property
    def activation(self) -> str:
        return {"float": "float", "int8": "int8 dynamic, {granularity}", TORCHAO: "int8 dynamic, per-token"}[self.engine]


def torchao_int8(model: nn.Module, full_precision_modules=()) -> nn.Module:
    """Return a copy of ``model`` whose decoder linear layers torchao quantizes to int8 weights and activations.

    The modules in ``full_precision_modules`` (fully qualified names, as in a quantization plan's
    ``ignore``) and the output head stay in float.
    """
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:
        raise ImportError("the torchao methods need torchao; install it with `pip install torchao`") from error
    from .architectures import family_for, linear_module_sites

    quantized = copy.deepcopy(model)
    sites = set(linear_module_sites(quantized, family_for(quantized))) - set(full_precision_modules)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and name in sites)
    return quantized


def share_unchanged_tensors(copy_: nn.Module, original: nn.Module) -> int:
    """Point parameters of ``copy_`` that equal ``original``'s at the same name to ``original``'s tensors.

    Returns the bytes no longer stored twice. Quantized layers have other names or values, so
    only unchanged tensors, such as embeddings, norms and the output head, are shared.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    originals = dict(original.named_parameters(remove_duplicate=False))
    released: dict[int, int] = {}
    for name, parameter in list(copy_.named_parameters(remove_duplicate=False)):
        source = originals.get(name)
        if source is None or source is parameter or is_traceable_wrapper_subclass(parameter.data):
            continue
        if source.shape != parameter.shape or source.dtype != parameter.dtype or not torch.equal(source, parameter):
            continue
        owner, _, attribute = name.rpartition(".")
        setattr(copy_.get_submodule(owner) if owner else copy_, attribute, source)
        released[id(parameter)] = parameter.numel() * parameter.element_size()
    return sum(released.values())


def full_precision_share(model: nn.Module, modules) -> float:
    """Return the fraction of decoder linear-layer weights, so of their multiply-adds per token, in ``modules``."""
    from .architectures import family_for, linear_module_sites
    from .quantizers import linear_weight

    sizes = {name: linear_weight(model.get_submodule(name)).numel() for name in linear_module_sites(model, family_for(model))}
    total = sum(sizes.values())
    return sum(sizes[name] for name in modules if name in sizes) / total if total else 0.0


def build_runners(model: nn.Module, names, qfem_modules=(), prefix_ids=None, act_granularity: str = "per-tensor",
                  fast_prefix_attention: bool = True) -> tuple[dict[str, Runner], dict[str, dict]]:
    """Build a runner per method name and return them with, per method, how it runs and what its weights take.

    With ``fast_prefix_attention`` every model uses ``spikelib.prefix_attention``, which gives the
    same output and runs faster behind a prefix. The methods' copies of the model share the
    tensors that quantization leaves unchanged (embeddings, norms, output head) with ``model``.
    Methods that need the QFeM modules or the prefix raise ``ValueError`` without them.
    """
    from . import prefix_attention, qfep

    parsed = [BenchMethod.parse(name) for name in names]
    if any(item.method.qfep for item in parsed) and not prefix_ids:
        raise ValueError("the qfep methods need a prefix; pass prefix_ids (a plan's, or from spikelib.qfep.search_prefix)")
    builder = methods.ConfigurationBuilder(model, None, list(qfem_modules), prefix_ids, progress=False)
    runners, details = {}, {}
    prefix = None
    fp_share = full_precision_share(model, qfem_modules)
    for item in parsed:
        if item.engine == TORCHAO:
            executed = torchao_int8(model, qfem_modules if item.method.qfem else ())
            if item.method.qfep:
                prefix = prefix or qfep.PrefixCache(model, prefix_ids)
            runner = Runner(executed, prefix if item.method.qfep else None)
        else:
            configuration = builder.build(item.method, act_granularity)
            executed = configuration.model
            if item.method.quantize:
                executed = int8.to_int8(executed, inplace=True)
            runner = Runner(executed, configuration.prefix)
        if executed is not model:
            share_unchanged_tensors(executed, model)
        if fast_prefix_attention:
            prefix_attention.use_prefix_attention(executed)
        runners[item.name] = runner
        weights = int8.linear_weight_bytes(executed)
        details[item.name] = {
            "engine": item.engine,
            "activation": item.activation.format(granularity=act_granularity),
            "fp_modules": len(qfem_modules) if item.method.qfem else 0,
            "fp_weight_share": round(fp_share, 4) if item.method.qfem else 0.0,
            "prefix_tokens": len(prefix_ids) if item.method.qfep else 0,
            "linear_weight_mb": round(sum(weights.values()) / 2**20, 2),
            "model_mb": round(model_bytes(executed) / 2**20, 1),
        }
    return runners, details


def sweep(runners: dict[str, Runner], details: dict[str, dict], seq_lens, vocab_size: int, repeats: int = 3,
          device: str | torch.device = "cpu", seed: int = 0, progress: bool = True) -> list[dict]:
    """Return one row per sequence length and method: latency, memory, and the method's details."""
    from tqdm.auto import tqdm

    rows = []
    for seq_len in tqdm(list(seq_lens), desc="prefill sweep", unit="length", disable=not progress):
        for name, result in prefill(runners, seq_len, vocab_size, repeats, device, seed).items():
            rows.append({"seq_len": seq_len, "method": name, **details[name], **result,
                         "peak_memory_mb": round(details[name]["model_mb"] + result["pass_memory_mb"], 1)})
    return rows
