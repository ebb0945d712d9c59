"""Selections for the ablation studies: module groups ranked by r(m), and prefix variants.

Module ablation: input sites are ranked by their max/median ratio r. The top, middle and bottom
groups of ``size`` sites are each quantized alone, with every other module in full precision,
so the study shows which modules carry the quantization damage. Prefix ablation compares no
prefix, the start token alone as a cache, the spike token after the start token, the searched
prefix, and random prefixes of the searched prefix's length.
"""

from __future__ import annotations

import random


def ranked_site_groups(site_ratios: dict[str, float], size: int = 4) -> dict[str, list[str]]:
    """Return the ``top``, ``middle`` and ``bottom`` ``size`` sites by ratio, each ordered by descending ratio.

    Ties are broken by site name so that the groups do not depend on dictionary order.
    """
    ranked = sorted(site_ratios, key=lambda site: (-site_ratios[site], site))
    if len(ranked) < 3 * size:
        raise ValueError(f"{len(ranked)} sites cannot form three disjoint groups of {size}; choose a smaller size")
    middle_start = (len(ranked) - size) // 2
    return {
        "top": ranked[:size],
        "middle": ranked[middle_start : middle_start + size],
        "bottom": ranked[-size:],
    }


def modules_of_sites(sites: list[str], module_sites: dict[str, str]) -> list[str]:
    """Return every linear module that reads one of ``sites`` (siblings included), sorted."""
    selected = set(sites)
    return sorted(module for module, site in module_sites.items() if site in selected)


def random_prefix(tokenizer, start_token_id: int, length: int, seed: int) -> list[int]:
    """Return ``[start, r_1, ..., r_{length-1}]`` with tokens drawn uniformly from the non-special vocabulary."""
    if length < 1:
        raise ValueError(f"invalid prefix length {length}; it counts the start token, so use 1 or more")
    special = set(tokenizer.all_special_ids)
    generator = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < length - 1:
        token = generator.randrange(len(tokenizer))
        if token not in special:
            tokens.append(token)
    return [start_token_id, *tokens]


def prefix_variants(start_token_id: int, searched_prefix: list[int], tokenizer, n_random: int, seed: int) -> dict[str, list[int] | None]:
    """Return the prefix ablation's variants by name; None means no prefix cache (start token in the quantized pass).

    ``searched_prefix`` is ``[start, c*, t*]``; the spike-token variant is ``[start, t*]``.
    """
    variants: dict[str, list[int] | None] = {
        "none": None,
        "start token": [start_token_id],
        "start + spike token": [start_token_id, searched_prefix[-1]],
        "searched": list(searched_prefix),
    }
    for index in range(n_random):
        variants[f"random {index + 1}"] = random_prefix(tokenizer, start_token_id, len(searched_prefix), seed + index)
    return variants
