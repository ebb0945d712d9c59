"""QFeP, the quantization-free prefix (Yang, Kim and Kim, 2024, arXiv:2405.14428, section 4.2).

Activation spikes sit on the first occurrence of a few tokens. If a short prefix that
contains such a token is computed once in full precision and its key/value cache is put in
front of every quantized forward pass, later tokens no longer spike and per-tensor
activation scales stay small.

Prefix search, as that section describes it: the target is the input site with the largest
max/median ratio r; candidate spike tokens t are the tokens at its largest-scale positions
(the opening BOS excluded); candidate context tokens c are the most frequent calibration
tokens. Each pair is scored on ``[BOS, c, t, c, t]`` by the target's scale at the first t
over its scale at the second t, running the model only up to the target layer. The prefix is
``[BOS, c*, t*]`` for the best pair.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from .architectures import family_for
from .hooks import TokenScales, forward_until, record_token_scales

logger = logging.getLogger(__name__)


@dataclass
class PrefixSearch:
    """Result of the prefix search, with the scores of the best pairs."""

    target_site: str
    target_layer: int
    spike_candidates: list[int]
    context_candidates: list[int]
    prefix_ids: list[int]
    prefix_tokens: list[str]
    prefix_text: str
    top_pairs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def spike_token_candidates(scales: TokenScales, site: str, n_candidates: int) -> list[int]:
    """Return up to ``n_candidates`` distinct token ids at the site's largest-scale positions.

    Position 0 of every calibration window (the start token) is excluded.
    """
    values = scales.scales[site][:, 1:]
    tokens = scales.token_ids[:, 1:]
    order = torch.argsort(values.flatten(), descending=True)
    candidates: list[int] = []
    for index in order.tolist():
        token = int(tokens.flatten()[index])
        if token not in candidates:
            candidates.append(token)
        if len(candidates) == n_candidates:
            break
    return candidates


def frequent_tokens(token_ids: torch.Tensor, n_candidates: int) -> list[int]:
    """Return the ``n_candidates`` most frequent token ids after the start position of each window."""
    counts = Counter(token_ids[:, 1:].flatten().tolist())
    return [token for token, _ in counts.most_common(n_candidates)]


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    start_token_id: int,
    pairs: list[tuple[int, int]],
    target_site: str,
    target_layer: int,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Return ``(n_pairs, 2)`` target scales at the first and second spike token of ``[BOS, c, t, c, t]``."""
    device = next(model.parameters()).device
    sequences = torch.tensor([[start_token_id, c, t, c, t] for c, t in pairs], dtype=torch.long)
    family = family_for(model)
    with record_token_scales(model, family, stop_after_layer=target_layer, capacity=len(pairs)) as recorder:
        for batch in tqdm(sequences.split(batch_size), desc="prefix search", unit="batch", disable=not progress):
            forward_until(model, batch.to(device))
    target = recorder.scales()[target_site]
    return target[:, [2, 4]]


def search_prefix(
    model: nn.Module,
    tokenizer,
    scales: TokenScales,
    ratios: dict[str, float],
    start_token_id: int,
    n_spike_candidates: int = 8,
    n_context_candidates: int = 64,
    batch_size: int = 256,
    progress: bool = True,
) -> PrefixSearch:
    """Search the prefix ``[BOS, c*, t*]`` on the full-precision model.

    ``ratios`` maps linear module names to r(m) (see ``spikelib.qfem.module_ratios``).
    """
    best_module = max(ratios, key=ratios.get)
    target_site = scales.module_sites[best_module]
    target_layer = scales.site_layers[target_site][0]

    spikes = spike_token_candidates(scales, target_site, n_spike_candidates)
    contexts = frequent_tokens(scales.token_ids, n_context_candidates)
    pairs = [(c, t) for t in spikes for c in contexts]
    measured = score_pairs(model, start_token_id, pairs, target_site, target_layer, batch_size, progress)
    score = measured[:, 0] / measured[:, 1].clamp(min=torch.finfo(measured.dtype).tiny)

    order = torch.argsort(score, descending=True).tolist()
    top = [
        {
            "context_id": pairs[i][0],
            "spike_id": pairs[i][1],
            "context": tokenizer.decode([pairs[i][0]]),
            "spike": tokenizer.decode([pairs[i][1]]),
            "first_scale": float(measured[i, 0]),
            "second_scale": float(measured[i, 1]),
            "score": float(score[i]),
        }
        for i in order[:10]
    ]
    context, spike = pairs[order[0]]
    prefix_ids = [start_token_id, context, spike]
    logger.info("QFeP prefix %s for target %s (score %.1f)", prefix_ids, target_site, float(score[order[0]]))
    return PrefixSearch(
        target_site=target_site,
        target_layer=target_layer,
        spike_candidates=spikes,
        context_candidates=contexts,
        prefix_ids=prefix_ids,
        prefix_tokens=[tokenizer.decode([token]) for token in prefix_ids],
        prefix_text=tokenizer.decode(prefix_ids),
        top_pairs=top,
    )


class PrefixCache:
    """Key/value cache of a prefix, computed once with the full-precision model.

    ``fresh()`` returns a deep copy for one forward pass, so the stored cache never grows.
    ``last_logits`` are the full-precision logits at the last prefix position, which predict
    the first token after the prefix.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, prefix_ids: list[int]):
        device = next(model.parameters()).device
        input_ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)
        output = model(input_ids=input_ids, use_cache=True)
        self.prefix_ids = list(prefix_ids)
        self.cache = output["cache"] if "cache" in output else output["past_key_values"]
        self.cache_keyword = cache_keyword(model)
        self.last_logits = output.logits[:, -1, :].float()

    def __len__(self) -> int:
        return len(self.prefix_ids)

    def fresh(self):
        """Return a private copy of the cache for one forward pass."""
        return copy.deepcopy(self.cache)

    def forward_kwargs(self) -> dict:
        """Return the keyword arguments that put a fresh copy of the cache in front of a forward pass."""
        return {self.cache_keyword: self.fresh(), "use_cache": True}


def cache_keyword(model: nn.Module) -> str:
    """Return the name of the forward argument that takes a KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache``; both are accepted here.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
