"""Named configurations (``fp``, ``w8a8``, ``w8a8+sq+qfem+qfep``, ...) built from one full-precision model.

A method name joins its parts with ``+``: ``w8a8`` (weight and activation INT8 fake
quantization), ``sq`` (SmoothQuant before quantization), ``qfem`` (full-precision activations for
the given modules) and ``qfep`` (the prefix cache). ``ConfigurationBuilder`` keeps what the
parts need (calibration windows, QFeM modules, prefix ids) and calibrates the channel maxima of
SmoothQuant and of static quantization once per setting, on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from . import perplexity, qfep, quantizers, smoothquant
from .attention_quant import enable_attention_quantization
from .channel_absmax import InputAbsmax, record_input_absmax

METHODS = (
    "fp",
    "w8a8",
    "w8a8+qfep",
    "w8a8+qfem",
    "w8a8+qfem+qfep",
    "w8a8+sq",
    "w8a8+sq+qfem",
    "w8a8+sq+qfep",
    "w8a8+sq+qfem+qfep",
)
_PART_LABELS = {"w8a8": "W8A8", "sq": "SQ", "qfem": "QFeM", "qfep": "QFeP"}


@dataclass(frozen=True)
class Method:
    """Parts of a configuration: quantization, SmoothQuant, QFeM and QFeP."""

    quantize: bool
    smooth: bool
    qfem: bool
    qfep: bool

    @classmethod
    def parse(cls, name: str) -> "Method":
        """Parse a name such as ``w8a8+sq+qfep``; parts come in the order of ``METHODS``."""
        canonical = name.strip().lower()
        if canonical not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        parts = set(canonical.split("+"))
        return cls(quantize="w8a8" in parts, smooth="sq" in parts, qfem="qfem" in parts, qfep="qfep" in parts)

    @property
    def name(self) -> str:
        if not self.quantize:
            return "fp"
        parts = ["w8a8"] + [part for part, used in (("sq", self.smooth), ("qfem", self.qfem), ("qfep", self.qfep)) if used]
        return "+".join(parts)

    @property
    def label(self) -> str:
        """Name for tables and figures, e.g. ``W8A8+SQ+QFeP``; ``FP`` for full precision."""
        if not self.quantize:
            return "FP"
        return "+".join(_PART_LABELS[part] for part in self.name.split("+"))


@dataclass
class Configuration:
    """A model ready to evaluate, with its prefix cache (None: the start token comes first)."""

    method: Method
    model: nn.Module
    prefix: qfep.PrefixCache | None
    act_granularity: str
    details: dict = field(default_factory=dict)


class ConfigurationBuilder:
    """Build configurations of one full-precision model.

    ``calibration_windows`` ``(n, seq_len)`` start with the start token, as
    ``spikelib.calibration.sample_windows`` returns them; with a prefix the start token is
    dropped and the prefix cache comes first. ``qfem_modules`` are the modules that keep
    full-precision activations under ``qfem``; ``prefix_ids`` is the QFeP prefix.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration_windows: torch.Tensor | None = None,
        qfem_modules: Iterable[str] | None = None,
        prefix_ids: list[int] | None = None,
        sq_alpha: float = 0.5,
        n_bits: int = 8,
        progress: bool = True,
    ):
        self.model = model
        self.calibration_windows = calibration_windows
        self.qfem_modules = None if qfem_modules is None else list(qfem_modules)
        self.prefix_ids = None if prefix_ids is None else list(prefix_ids)
        self.sq_alpha = sq_alpha
        self.n_bits = n_bits
        self.progress = progress
        self._absmax: dict[tuple, InputAbsmax] = {}

    def build(
        self,
        method: str | Method,
        act_granularity: str = "per-tensor",
        quantize_attention: bool = False,
        modules: Iterable[str] | None = None,
        prefix_ids: list[int] | None = None,
    ) -> Configuration:
        """Return the configuration ``method`` with the given activation granularity.

        ``modules`` limits quantization to those decoder linear modules (everything else stays
        in full precision); ``prefix_ids`` replaces the builder's prefix for this configuration.
        """
        method = Method.parse(method) if isinstance(method, str) else method
        prefix_ids = list(prefix_ids) if prefix_ids is not None else self.prefix_ids
        if method.qfep and not prefix_ids:
            raise ValueError(f"{method.name} needs prefix ids; pass prefix_ids (from spikelib.qfep.search_prefix)")
        # An empty list is a valid QFeM choice (no module passed alpha), so only None is missing.
        if method.qfem and self.qfem_modules is None:
            raise ValueError(f"{method.name} needs the QFeM modules; pass qfem_modules (from spikelib.qfem.select_modules)")
        if not method.quantize:
            return Configuration(method, self.model, None, "none")

        base, details = self.model, {}
        prefix_key = tuple(prefix_ids) if method.qfep else None
        if method.smooth:
            base, factors = smoothquant.smooth_model(self.model, self._input_absmax(self.model, "fp", prefix_key), self.sq_alpha)
            details["sq_alpha"] = self.sq_alpha
            details["smoothed_sites"] = len(factors)
        prefix = qfep.PrefixCache(base, prefix_ids) if method.qfep else None

        static_absmax = None
        if act_granularity == "static":
            stage = "sq" if method.smooth else "fp"
            static_absmax = self._input_absmax(base, stage, prefix_key, prefix).module_absmax()
        config = quantizers.QuantConfig(n_bits=self.n_bits, act_granularity=act_granularity)
        full_precision = self.qfem_modules if method.qfem else ()
        if modules is not None:
            modules = list(modules)
            full_precision = [name for name in full_precision if name in modules]
        quantized = quantizers.quantize_model(base, config, full_precision, static_absmax, inplace=base is not self.model, modules=modules)
        if quantize_attention:
            enable_attention_quantization(quantized, self.n_bits, "per-token" if act_granularity == "per-token" else "per-tensor")
            details["quantized_attention"] = True
        if method.qfem:
            details["fp_modules"] = len(full_precision)
        if prefix is not None:
            details["prefix_ids"] = list(prefix_ids)
        return Configuration(method, quantized, prefix, act_granularity, details)

    def channel_absmax(self, prefix_ids: list[int] | None = None) -> InputAbsmax:
        """Return the full-precision model's per-channel input maxima on the calibration windows.

        With ``prefix_ids`` the windows run after that prefix's cache. These are the maxima
        SmoothQuant's factors come from.
        """
        return self._input_absmax(self.model, "fp", None if prefix_ids is None else tuple(prefix_ids))

    def _input_absmax(self, model: nn.Module, stage: str, prefix_key: tuple | None, prefix=None) -> InputAbsmax:
        """Return (and keep) channel maxima of ``model`` on the calibration windows, after the prefix if any."""
        key = (stage, prefix_key)
        if key not in self._absmax:
            if self.calibration_windows is None:
                raise ValueError("SmoothQuant and static quantization need calibration_windows")
            windows = self.calibration_windows
            if prefix_key is not None:
                prefix = prefix or qfep.PrefixCache(model, list(prefix_key))
                windows = windows[:, 1:]
            self._absmax[key] = record_input_absmax(model, windows, prefix, progress=self.progress)
        return self._absmax[key]


def evaluate(configuration: Configuration, windows: torch.Tensor, start_token_id: int, progress: bool = True, description: str | None = None):
    """Return the windowed perplexity of a configuration (see ``spikelib.perplexity``)."""
    start = None if configuration.prefix is not None else start_token_id
    label = description or configuration.method.label
    return perplexity.evaluate_perplexity(configuration.model, windows, start, configuration.prefix, progress, label)
