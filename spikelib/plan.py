"""Quantization plans: what a calibration decided, as a JSON file that reloads onto a fresh model.

A plan names the W8A8 setting, the modules whose activations QFeM keeps in full precision, the
QFeP prefix, and the calibrated input maxima of every decoder linear module. Module names are
the models' own fully qualified names (``model.layers.11.mlp.down_proj``), which is the form
that llm-compressor's ``ignore`` list and torchao's ``filter_fn`` take. ``ignore`` in the file
adds ``lm_head``, which W8A8 leaves in full precision as well.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn

from . import methods
from .architectures import family_for, linear_module_sites

FORMAT_VERSION = 1
PLAN_GRANULARITIES = ("per-tensor", "per-token")


@dataclass
class QuantizationPlan:
    """A W8A8 configuration of one model, independent of the model object."""

    model_name: str
    method: str
    act_granularity: str = "per-tensor"
    n_bits: int = 8
    full_precision_modules: list[str] = field(default_factory=list)
    prefix_ids: list[int] | None = None
    prefix_tokens: list[str] | None = None
    input_absmax: dict[str, float] = field(default_factory=dict)
    alpha: float | None = None

    def __post_init__(self) -> None:
        parsed = methods.Method.parse(self.method)
        if parsed.smooth:
            raise ValueError(f"invalid plan method {self.method!r}: a plan does not store SmoothQuant's per-channel "
                             "maxima; use a method without sq")
        if self.act_granularity not in PLAN_GRANULARITIES:
            raise ValueError(f"invalid plan act_granularity {self.act_granularity!r}; choose one of "
                             f"{', '.join(PLAN_GRANULARITIES)} (static scales need calibration windows)")
        if not isinstance(self.full_precision_modules, list) or not all(
                isinstance(name, str) for name in self.full_precision_modules):
            raise ValueError("invalid plan: full_precision_modules must be a list of module names, "
                             f"got {self.full_precision_modules!r}")
        if self.prefix_ids is not None and (not isinstance(self.prefix_ids, list)
                                            or not all(isinstance(token, int) for token in self.prefix_ids)):
            raise ValueError(f"invalid plan: prefix_ids must be a list of token ids or null, got {self.prefix_ids!r}")

    @property
    def ignore(self) -> list[str]:
        """Return the modules to leave unquantized, for llm-compressor's ``ignore`` or a torchao filter."""
        return ["lm_head", *sorted(self.full_precision_modules)]

    def to_dict(self) -> dict:
        payload = {"format_version": FORMAT_VERSION, **asdict(self), "ignore": self.ignore}
        return payload

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        from .artifacts import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "QuantizationPlan":
        """Read a plan written by ``save``; a file that is not such a plan raises ``ValueError``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}; write one with QuantizationPlan.save or "
                                    "`spikelib bench --save-plan FILE`")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); write the plan again with QuantizationPlan.save") from error
        if not isinstance(payload, dict):
            raise ValueError(f"{path} contains a JSON {type(payload).__name__}, not a plan object")
        version = payload.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has plan format {version!r}; this spikelib reads format {FORMAT_VERSION}")
        payload.pop("ignore", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"{path} has unknown plan fields {unknown}; expected {sorted(known)}")
        missing = sorted(name for name in ("model_name", "method") if name not in payload)
        if missing:
            raise ValueError(f"{path} lacks the plan fields {missing}")
        return cls(**payload)

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the plan names modules or prefix tokens that the model does not have.

        A plan made for another model of the same family can pass this check; compare
        ``model_name`` as well where the model's name is known.
        """
        vocab_size = model.get_input_embeddings().num_embeddings
        outside = [token for token in self.prefix_ids or () if not 0 <= token < vocab_size]
        if outside:
            raise ValueError(f"invalid plan: {self.model_name}'s plan has prefix ids {outside} outside this model's "
                             f"vocabulary of {vocab_size} tokens. Load the model the plan was made for.")
        modules = linear_module_sites(model, family_for(model))
        missing = sorted(set(self.full_precision_modules) - modules.keys())
        if missing:
            raise ValueError(f"invalid plan: {self.model_name}'s plan names modules that this model does not have "
                             f"({missing[:5]}). Load the model the plan was made for.")

    def apply(self, model: nn.Module, progress: bool = False) -> methods.Configuration:
        """Return the configuration of the plan on ``model``, a freshly loaded full-precision model."""
        self.check_model(model)
        builder = methods.ConfigurationBuilder(model, None, self.full_precision_modules, self.prefix_ids,
                                               n_bits=self.n_bits, progress=progress)
        return builder.build(self.method, act_granularity=self.act_granularity)


def plan_from_choices(model_name: str, method: str, full_precision_modules: list[str], prefix_ids: list[int] | None,
                      tokenizer=None, input_absmax: dict[str, float] | None = None, alpha: float | None = None,
                      act_granularity: str = "per-tensor") -> QuantizationPlan:
    """Return a plan from a calibration's choices; modules and prefix are kept only where ``method`` uses them."""
    parsed = methods.Method.parse(method)
    prefix = list(prefix_ids) if parsed.qfep and prefix_ids else None
    return QuantizationPlan(
        model_name=model_name,
        method=parsed.name,
        act_granularity=act_granularity,
        full_precision_modules=sorted(full_precision_modules) if parsed.qfem else [],
        prefix_ids=prefix,
        prefix_tokens=[tokenizer.decode([token]) for token in prefix] if prefix and tokenizer is not None else None,
        input_absmax=dict(input_absmax or {}),
        alpha=alpha,
    )


def input_absmax_from_scales(scales) -> dict[str, float]:
    """Return each module's calibrated input maximum from recorded token scales (``spikelib.hooks.TokenScales``)."""
    site_max = scales.site_max()
    return {module: site_max[site] for module, site in sorted(scales.module_sites.items())}


def plan_from_results(model_name: str, main_model_name: str, results_dir: str | Path = "results") -> QuantizationPlan:
    """Return the W8A8+QFeM+QFeP plan that the pipeline chose for ``model_name``.

    The main model's choices come from the main results stage (``main/qfem_selection.json``,
    ``main/qfep_prefix.json``, ``calibration/token_scales.pt``); any other model's from the zoo
    stages (``zoo/main_table.json``, ``zoo/scales/<model>.pt``). A model the pipeline did not run
    on raises ``ValueError``.
    """
    from .artifacts import slug
    from .hooks import TokenScales

    results = Path(results_dir)
    if model_name == main_model_name:
        selection = json.loads((results / "main" / "qfem_selection.json").read_text())
        prefix = json.loads((results / "main" / "qfep_prefix.json").read_text())
        choices = {"alpha": selection["alpha"], "qfem_modules": selection["modules"],
                   "prefix_ids": prefix["prefix_ids"], "prefix_tokens": prefix["prefix_tokens"]}
        scales_path = results / "calibration" / "token_scales.pt"
    else:
        zoo = json.loads((results / "zoo" / "main_table.json").read_text())["choices"]
        if model_name not in zoo:
            raise ValueError(f"the pipeline chose no QFeM modules or prefix for {model_name!r}: add it to "
                             f"zoo_main.model_names in params.yaml and run `dvc repro zoo_main` (it has {sorted(zoo)})")
        choices = zoo[model_name]
        scales_path = results / "zoo" / "scales" / f"{slug(model_name)}.pt"
    return QuantizationPlan(model_name=model_name, method="w8a8+qfem+qfep",
                            full_precision_modules=sorted(choices["qfem_modules"]), prefix_ids=list(choices["prefix_ids"]),
                            prefix_tokens=choices.get("prefix_tokens"), alpha=choices["alpha"],
                            input_absmax=input_absmax_from_scales(TokenScales.load(scales_path)))
