"""Calibration: seeded random windows of C4 text and the token-wise scales they produce."""

from __future__ import annotations

import logging
import random

import torch
import torch.nn as nn
from tqdm import tqdm

from .architectures import family_for
from .hooks import TokenScales, record_token_scales

logger = logging.getLogger(__name__)


def sample_windows(
    tokenizer, documents: list[str], n_windows: int, seq_len: int, start_token_id: int, seed: int
) -> torch.Tensor:
    """Sample ``n_windows`` random windows of ``seq_len`` tokens, each opened by ``start_token_id``.

    A window is ``start_token_id`` followed by ``seq_len - 1`` consecutive tokens from a random
    position of a random document long enough to hold them. Returns ``(n_windows, seq_len)``.
    """
    if n_windows < 1 or seq_len < 2:
        raise ValueError(f"need n_windows >= 1 and seq_len >= 2, got {n_windows} and {seq_len}")
    body = seq_len - 1
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
    long_enough = [ids for ids in encoded if len(ids) >= body]
    if not long_enough:
        longest = max((len(ids) for ids in encoded), default=0)
        raise ValueError(
            f"no document has {body} tokens for windows of seq_len={seq_len}; the longest has "
            f"{longest}. Lower seq_len or provide longer documents."
        )

    rng = random.Random(seed)
    windows = []
    for _ in range(n_windows):
        ids = rng.choice(long_enough)
        start = rng.randint(0, len(ids) - body)
        windows.append([start_token_id] + ids[start : start + body])
    return torch.tensor(windows, dtype=torch.long)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> TokenScales:
    """Record the token-wise scales of every input site and hidden state over ``windows``."""
    family = family_for(model)
    device = next(model.parameters()).device
    batches = windows.split(batch_size)
    with record_token_scales(model, family, capacity=len(windows)) as recorder:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    return TokenScales(
        scales=recorder.scales(),
        token_ids=windows.clone(),
        module_sites=dict(recorder.module_sites),
        site_layers=dict(recorder.site_layers),
        metadata={"n_windows": windows.shape[0], "seq_len": windows.shape[1], "family": family.name},
    )
