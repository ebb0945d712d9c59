"""Prefill latency and peak memory of several configurations, measured side by side.

Each method runs a batch of one sequence of ``seq_len`` random tokens (with its prefix cache in
front for QFeP methods). After one warm-up pass per method, the timed passes go round-robin over
the methods, so that a slow spell of a shared machine touches all of them. The median is reported.
Memory on CPU is the peak resident set size, sampled every 5 ms during a method's warm-up pass,
minus the size just before it. On CUDA it is ``torch.cuda.max_memory_allocated`` over that pass.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Runner:
    """One method: its model and an optional prefix cache (``spikelib.qfep.PrefixCache``)."""

    model: nn.Module
    prefix: object | None = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> None:
        if self.prefix is None:
            self.model(input_ids=input_ids, use_cache=False)
        else:
            self.model(input_ids=input_ids, **self.prefix.forward_kwargs())


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
    """Return, per method, the median prefill latency in ms, every timed run, and the peak memory in MB."""
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
        name: {"prefill_ms": statistics.median(values), "runs_ms": [round(v, 2) for v in values],
               "peak_memory_mb": round(memory[name], 1)}
        for name, values in times.items()
    }
