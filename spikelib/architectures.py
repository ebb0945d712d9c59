"""Declarative table of decoder families: where the layers are and which linear modules share an input.

Hooks, quantizers, QFeM, QFeP and SmoothQuant read module names from this table only, so
supporting a new family means adding one entry to ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch.nn as nn

# Placeholder in the module paths of routed experts, replaced by 0 .. n_experts - 1.
EXPERT = "{expert}"


@dataclass(frozen=True)
class InputSite:
    """Linear modules of one decoder layer that read the same input tensor.

    ``label`` names the site in tables and figures; ``modules`` are paths relative to the
    decoder layer. Siblings (q/k/v, gate/up, or attention and MLP inputs of a parallel block)
    share one token-wise scale and one QFeM decision. ``norm`` is the normalization layer whose
    output is exactly this input, so that SmoothQuant can fold its smoothing factors into the
    norm's weight; it is None where another operation comes between them (o_proj, down_proj) or
    where the norm has no weight. Paths that contain ``{expert}`` belong to routed experts: each
    expert receives only the tokens routed to it.
    """

    label: str
    modules: tuple[str, ...]
    norm: str | None = None

    @property
    def routed(self) -> bool:
        return EXPERT in self.modules[0]


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts block keeps its router and experts, relative to the decoder layer.

    transformers stores the experts of a layer as stacked 3-D weights. ``prepare_model``
    replaces them by ``n_experts`` modules with one ``nn.Linear`` per projection, so that hooks
    and quantizers treat them like any other linear layer. The router stays in full precision.
    """

    block: str
    container: str
    router: str
    count_attribute: str


@dataclass(frozen=True)
class Family:
    """Module layout of one decoder family.

    ``norm_style`` describes the normalization (``rms``, ``rms (1 + w)``, ``layernorm``,
    ``layernorm without weight``); ``norm_offset`` is 1 for norms that compute
    ``(1 + w) * normalize(x)`` and 0 otherwise. ``embed_scale`` marks families whose model
    multiplies the token embeddings by sqrt(hidden size); that happens inside the model, so a
    prefix cache and a plain forward pass see the same scaled embeddings. ``when`` selects this
    entry among several for one model type from the model's config.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    sites: tuple[InputSite, ...]
    glu: bool
    norm_style: str = "rms"
    norm_offset: float = 0.0
    embed_scale: bool = False
    experts: Experts | None = None
    when: Callable[[object], bool] | None = None


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def _llama_sites(qkv_norm: str | None, mlp_norm: str | None) -> tuple[InputSite, ...]:
    return (
        InputSite("qkv_proj", _QKV, norm=qkv_norm),
        InputSite("o_proj", ("self_attn.o_proj",)),
        InputSite("gate_up_proj", _GATE_UP, norm=mlp_norm),
        InputSite("down_proj", ("mlp.down_proj",)),
    )


def _falcon_layout(config) -> str:
    """Return ``parallel`` (one norm feeds attention and MLP), ``two norms`` or ``sequential``."""
    if not getattr(config, "parallel_attn", True) and not getattr(config, "new_decoder_architecture", False):
        return "sequential"
    if getattr(config, "new_decoder_architecture", False) and (getattr(config, "num_ln_in_parallel_attn", None) or 2) == 2:
        return "two norms"
    return "parallel"


def _falcon_sites(qkv_norm: str, mlp_norm: str | None) -> tuple[InputSite, ...]:
    qkv, h_to_4h = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    first = (
        (InputSite("qkv_h_to_4h", (qkv, h_to_4h), norm=qkv_norm),)
        if mlp_norm is None
        else (InputSite("query_key_value", (qkv,), norm=qkv_norm), InputSite("dense_h_to_4h", (h_to_4h,), norm=mlp_norm))
    )
    return first + (
        InputSite("dense", ("self_attention.dense",)),
        InputSite("dense_4h_to_h", ("mlp.dense_4h_to_h",)),
    )


FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        sites=_llama_sites("input_layernorm", "post_attention_layernorm"),
        glu=True,
    ),
    "mixtral": Family(
        name="mixtral",
        model_types=("mixtral",),
        layers="model.layers",
        sites=(
            InputSite("qkv_proj", _QKV, norm="input_layernorm"),
            InputSite("o_proj", ("self_attn.o_proj",)),
            InputSite("experts.gate_up_proj", ("mlp.experts.{expert}.gate_proj", "mlp.experts.{expert}.up_proj")),
            InputSite("experts.down_proj", ("mlp.experts.{expert}.down_proj",)),
        ),
        glu=True,
        experts=Experts(block="mlp", container="mlp.experts", router="mlp.gate", count_attribute="num_local_experts"),
    ),
    "phi3": Family(
        name="phi3",
        model_types=("phi3",),
        layers="model.layers",
        sites=(
            InputSite("qkv_proj", ("self_attn.qkv_proj",), norm="input_layernorm"),
            InputSite("o_proj", ("self_attn.o_proj",)),
            InputSite("gate_up_proj", ("mlp.gate_up_proj",), norm="post_attention_layernorm"),
            InputSite("down_proj", ("mlp.down_proj",)),
        ),
        glu=True,
    ),
    "olmo": Family(
        name="olmo",
        model_types=("olmo",),
        layers="model.layers",
        sites=_llama_sites(None, None),
        glu=True,
        norm_style="layernorm without weight",
    ),
    # OLMo-2 normalizes the outputs of attention and MLP, so their inputs are the raw residual stream.
    "olmo2": Family(
        name="olmo2",
        model_types=("olmo2",),
        layers="model.layers",
        sites=_llama_sites(None, None),
        glu=True,
        norm_style="rms after attention and MLP",
    ),
    "gemma": Family(
        name="gemma",
        model_types=("gemma",),
        layers="model.layers",
        sites=_llama_sites("input_layernorm", "post_attention_layernorm"),
        glu=True,
        norm_style="rms (1 + w)",
        norm_offset=1.0,
        embed_scale=True,
    ),
    # Gemma-2 and Gemma-3 normalize the attention output (post_attention_layernorm) and feed the
    # MLP from a separate pre_feedforward_layernorm.
    "gemma2": Family(
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        layers="model.layers",
        sites=_llama_sites("input_layernorm", "pre_feedforward_layernorm"),
        glu=True,
        norm_style="rms (1 + w)",
        norm_offset=1.0,
        embed_scale=True,
    ),
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        sites=(
            InputSite("c_attn", ("attn.c_attn",), norm="ln_1"),
            InputSite("attn_c_proj", ("attn.c_proj",)),
            InputSite("c_fc", ("mlp.c_fc",), norm="ln_2"),
            InputSite("mlp_c_proj", ("mlp.c_proj",)),
        ),
        glu=False,
        norm_style="layernorm",
    ),
    "opt": Family(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        sites=(
            InputSite("qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), norm="self_attn_layer_norm"),
            InputSite("out_proj", ("self_attn.out_proj",)),
            InputSite("fc1", ("fc1",), norm="final_layer_norm"),
            InputSite("fc2", ("fc2",)),
        ),
        glu=False,
        norm_style="layernorm",
    ),
    "gpt_neox": Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        sites=(
            InputSite("query_key_value", ("attention.query_key_value",), norm="input_layernorm"),
            InputSite("dense", ("attention.dense",)),
            InputSite("dense_h_to_4h", ("mlp.dense_h_to_4h",), norm="post_attention_layernorm"),
            InputSite("dense_4h_to_h", ("mlp.dense_4h_to_h",)),
        ),
        glu=False,
        norm_style="layernorm",
    ),
    # Falcon-7B runs attention and MLP in parallel on one norm's output. Falcon-40B style models
    # give each its own norm, and without parallel_attn the two run one after the other.
    "falcon": Family(
        name="falcon",
        model_types=("falcon",),
        layers="transformer.h",
        sites=_falcon_sites("input_layernorm", None),
        glu=False,
        norm_style="layernorm",
        when=lambda config: _falcon_layout(config) == "parallel",
    ),
    "falcon_two_norms": Family(
        name="falcon_two_norms",
        model_types=("falcon",),
        layers="transformer.h",
        sites=_falcon_sites("ln_attn", "ln_mlp"),
        glu=False,
        norm_style="layernorm",
        when=lambda config: _falcon_layout(config) == "two norms",
    ),
    "falcon_sequential": Family(
        name="falcon_sequential",
        model_types=("falcon",),
        layers="transformer.h",
        sites=_falcon_sites("input_layernorm", "post_attention_layernorm"),
        glu=False,
        norm_style="layernorm",
        when=lambda config: _falcon_layout(config) == "sequential",
    ),
    # Phi-2: attention and MLP both read the output of input_layernorm.
    "phi": Family(
        name="phi",
        model_types=("phi",),
        layers="model.layers",
        sites=(
            InputSite("qkv_fc1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), norm="input_layernorm"),
            InputSite("dense", ("self_attn.dense",)),
            InputSite("fc2", ("mlp.fc2",)),
        ),
        glu=False,
        norm_style="layernorm",
    ),
    "mpt": Family(
        name="mpt",
        model_types=("mpt",),
        layers="transformer.blocks",
        sites=(
            InputSite("Wqkv", ("attn.Wqkv",), norm="norm_1"),
            InputSite("out_proj", ("attn.out_proj",)),
            InputSite("up_proj", ("ffn.up_proj",), norm="norm_2"),
            InputSite("down_proj", ("ffn.down_proj",)),
        ),
        glu=False,
        norm_style="layernorm",
    ),
}

# Label of the layer's output hidden state in recorded scales and figures.
HIDDEN_LABEL = "hidden"


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose ``config.model_type`` is not in ``FAMILIES``."""


def supported_model_types() -> list[str]:
    """Return every ``config.model_type`` that has a family entry."""
    return sorted({t for family in FAMILIES.values() for t in family.model_types})


def family_for(model: nn.Module) -> Family:
    """Return the family entry for a transformers model, from ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types and (family.when is None or family.when(config)):
            return family
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={model_type!r}. Supported model types: "
        f"{', '.join(supported_model_types())}. To add one, append a Family entry to "
        "spikelib.architectures.FAMILIES naming its decoder layer list and the linear modules of "
        "each input site (see docs/architectures.md)."
    )


def describe_families() -> list[dict]:
    """Return the table as plain rows, for the command line and the documentation."""
    rows = []
    for family in FAMILIES.values():
        rows.append({
            "family": family.name,
            "model_types": list(family.model_types),
            "layers": family.layers,
            "glu": family.glu,
            "norm_style": family.norm_style,
            "embed_scale": family.embed_scale,
            "sites": {site.label: list(site.modules) for site in family.sites},
            "smoothquant_norms": {site.label: site.norm for site in family.sites if site.norm},
            "router": family.experts.router if family.experts else None,
        })
    return rows


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """Return the model's list of decoder layers."""
    return model.get_submodule(family.layers)


def site_name(family: Family, layer_index: int, label: str) -> str:
    """Return the key of one input site, e.g. ``model.layers.11.down_proj``."""
    return f"{family.layers}.{layer_index}.{label}"


def n_experts(model: nn.Module, family: Family) -> int:
    """Return the number of routed experts per layer (0 for dense families)."""
    if family.experts is None:
        return 0
    return int(getattr(model.config, family.experts.count_attribute))


def site_modules(model: nn.Module, family: Family, site: InputSite) -> list[str]:
    """Return the site's module paths relative to a decoder layer, with experts expanded.

    For routed sites the order is expert by expert: all modules of expert 0, then expert 1, ...
    """
    if not site.routed:
        return list(site.modules)
    return [module.replace(EXPERT, str(e)) for e in range(n_experts(model, family)) for module in site.modules]


def site_input_modules(model: nn.Module, family: Family, site: InputSite) -> list[str]:
    """Return the modules whose inputs together make up the site's input: the first sibling, of every expert."""
    if not site.routed:
        return [site.modules[0]]
    return [site.modules[0].replace(EXPERT, str(e)) for e in range(n_experts(model, family))]


def iter_sites(model: nn.Module, family: Family) -> Iterator[tuple[int, nn.Module, InputSite, str]]:
    """Yield ``(layer index, layer, site, site name)`` for every input site of the model."""
    prepare_model(model, family)
    for index, layer in enumerate(decoder_layers(model, family)):
        for site in family.sites:
            yield index, layer, site, site_name(family, index, site.label)


def linear_module_sites(model: nn.Module, family: Family) -> dict[str, str]:
    """Map every quantizable linear module's full name to the name of its input site."""
    mapping: dict[str, str] = {}
    for index, _, site, name in iter_sites(model, family):
        for module in site_modules(model, family, site):
            mapping[f"{family.layers}.{index}.{module}"] = name
    return mapping


def prepare_model(model: nn.Module, family: Family | None = None) -> nn.Module:
    """Replace stacked expert weights by per-expert linear modules; a no-op for dense families.

    Called by every function that reads the family table, so users need not call it; calling
    it twice changes nothing. The model computes the same function afterwards.
    """
    family = family or family_for(model)
    if family.experts is None:
        return model
    from .experts import LinearExperts

    for layer in decoder_layers(model, family):
        container = layer.get_submodule(family.experts.container)
        if not isinstance(container, LinearExperts):
            parent, _, child = family.experts.container.rpartition(".")
            setattr(layer.get_submodule(parent), child, LinearExperts.from_stacked(container))
    return model
