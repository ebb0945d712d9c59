"""Declarative table of decoder families: where the layers are and which linear modules share an input.

Hooks, quantizers, QFeM and QFeP read module names from this table only, so supporting a
new family means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class InputSite:
    """Linear modules of one decoder layer that read the same input tensor.

    ``label`` names the site in tables and figures; ``modules`` are paths relative to the
    decoder layer. Siblings (q/k/v, gate/up) share one token-wise scale and one QFeM decision.
    ``norm`` is the normalization layer whose output is exactly this input, so that SmoothQuant
    can fold its smoothing factors into the norm's weight; it is None where another operation
    comes between them (o_proj, down_proj).
    """

    label: str
    modules: tuple[str, ...]
    norm: str | None = None


@dataclass(frozen=True)
class Family:
    """Module layout of one decoder family.

    ``norm_offset`` is 0 for norms that compute ``w * normalize(x)`` and 1 for the Gemma norms
    that compute ``(1 + w) * normalize(x)``.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    sites: tuple[InputSite, ...]
    glu: bool
    norm_offset: float = 0.0


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

_LLAMA_SITES = (
    InputSite("qkv_proj", _QKV, norm="input_layernorm"),
    InputSite("o_proj", ("self_attn.o_proj",)),
    InputSite("gate_up_proj", _GATE_UP, norm="post_attention_layernorm"),
    InputSite("down_proj", ("mlp.down_proj",)),
)

# Gemma-2 and Gemma-3 normalize the attention output (post_attention_layernorm) and feed the
# MLP from a separate pre_feedforward_layernorm.
_GEMMA2_SITES = (
    InputSite("qkv_proj", _QKV, norm="input_layernorm"),
    InputSite("o_proj", ("self_attn.o_proj",)),
    InputSite("gate_up_proj", _GATE_UP, norm="pre_feedforward_layernorm"),
    InputSite("down_proj", ("mlp.down_proj",)),
)

FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        sites=_LLAMA_SITES,
        glu=True,
    ),
    "gemma": Family(
        name="gemma",
        model_types=("gemma",),
        layers="model.layers",
        sites=_LLAMA_SITES,
        glu=True,
        norm_offset=1.0,
    ),
    "gemma2": Family(
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        layers="model.layers",
        sites=_GEMMA2_SITES,
        glu=True,
        norm_offset=1.0,
    ),
}

# Label of the layer's output hidden state in recorded scales and figures.
HIDDEN_LABEL = "hidden"


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose ``config.model_type`` is not in ``FAMILIES``."""


def family_for(model: nn.Module) -> Family:
    """Return the family entry for a transformers model, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in FAMILIES.values() for t in family.model_types)
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={model_type!r}. Supported model types: "
        f"{', '.join(supported)}. To add one, append a Family entry to "
        "spikelib.architectures.FAMILIES naming its decoder layer list and its linear modules."
    )


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """Return the model's list of decoder layers."""
    return model.get_submodule(family.layers)


def site_name(family: Family, layer_index: int, label: str) -> str:
    """Return the key of one input site, e.g. ``model.layers.11.down_proj``."""
    return f"{family.layers}.{layer_index}.{label}"


def linear_module_sites(model: nn.Module, family: Family) -> dict[str, str]:
    """Map every quantizable linear module's full name to the name of its input site."""
    mapping: dict[str, str] = {}
    for index, _ in enumerate(decoder_layers(model, family)):
        for site in family.sites:
            for module in site.modules:
                mapping[f"{family.layers}.{index}.{module}"] = site_name(family, index, site.label)
    return mapping
