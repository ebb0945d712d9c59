"""QFeM: max/median ratios, module selection, the alpha grid and the threshold search."""

from __future__ import annotations

import math

import pytest
import torch

from spikelib.architectures import family_for, linear_module_sites
from spikelib.hooks import TokenScales
from spikelib.qfem import choose_alpha, module_ratios, search_threshold, select_modules, site_ratios, threshold_grid
from spikelib.quantizers import FakeQuantLinear, quantize_model

# Sites of one decoder layer. Every tensor has 9 values, so the median is the 5th smallest.
MODULE_SITES = {
    "layer.q_proj": "layer.qkv_proj",
    "layer.k_proj": "layer.qkv_proj",
    "layer.v_proj": "layer.qkv_proj",
    "layer.o_proj": "layer.o_proj",
    "layer.gate_proj": "layer.gate_up_proj",
    "layer.up_proj": "layer.gate_up_proj",
    "layer.down_proj": "layer.down_proj",
}


def hand_scales() -> TokenScales:
    scales = {
        # Sorted: 1 2 3 4 [5] 6 7 8 90 -> 90 / 5 = 18.
        "layer.qkv_proj": torch.tensor([[3.0, 1.0, 90.0], [5.0, 2.0, 8.0], [4.0, 7.0, 6.0]]),
        # Sorted: 2 2 2 2 [2] 3 3 3 3 -> 3 / 2 = 1.5.
        "layer.o_proj": torch.tensor([[2.0, 3.0, 2.0], [3.0, 2.0, 3.0], [2.0, 3.0, 2.0]]),
        # Sorted: 0.5 1 1 1 [1] 1 1 1 4 -> 4 / 1 = 4.
        "layer.gate_up_proj": torch.tensor([[1.0, 1.0, 4.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]]),
        # Sorted: 0.1 0.2 0.2 0.3 [0.4] 0.5 0.5 0.6 400 -> 400 / 0.4 = 1000.
        "layer.down_proj": torch.tensor([[400.0, 0.2, 0.5], [0.3, 0.4, 0.1], [0.2, 0.6, 0.5]]),
        # Hidden states are recorded too, but are not an input of any linear module.
        "layer.hidden": torch.tensor([[1e6, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
    }
    site_layers = {site: (0, site.split(".")[1]) for site in scales}
    return TokenScales(scales, torch.zeros(3, 3, dtype=torch.long), dict(MODULE_SITES), site_layers)


# --- ratios -------------------------------------------------------------------------------


def test_site_ratios_reference():
    ratios = site_ratios(hand_scales())
    assert ratios.keys() == {"layer.qkv_proj", "layer.o_proj", "layer.gate_up_proj", "layer.down_proj"}
    assert ratios["layer.qkv_proj"] == pytest.approx(18.0)
    assert ratios["layer.o_proj"] == pytest.approx(1.5)
    assert ratios["layer.gate_up_proj"] == pytest.approx(4.0)
    assert ratios["layer.down_proj"] == pytest.approx(1000.0)


def test_site_ratios_exclude_hidden():
    assert "layer.hidden" not in site_ratios(hand_scales())


def test_site_ratios_zero_median():
    scales = hand_scales()
    scales.scales["layer.o_proj"] = torch.tensor([[0.0, 0.0, 5.0]])
    assert site_ratios(scales)["layer.o_proj"] == math.inf


def test_module_ratios_siblings_equal():
    ratios = module_ratios(hand_scales())
    assert ratios.keys() == MODULE_SITES.keys()
    assert ratios["layer.q_proj"] == pytest.approx(18.0)
    assert ratios["layer.k_proj"] == ratios["layer.q_proj"]
    assert ratios["layer.v_proj"] == ratios["layer.q_proj"]
    assert ratios["layer.gate_proj"] == pytest.approx(4.0)
    assert ratios["layer.up_proj"] == ratios["layer.gate_proj"]
    assert ratios["layer.down_proj"] == pytest.approx(1000.0)


# --- select_modules -----------------------------------------------------------------------


def test_select_modules_above_alpha():
    ratios = module_ratios(hand_scales())
    assert select_modules(ratios, 10.0, MODULE_SITES) == [
        "layer.down_proj",
        "layer.k_proj",
        "layer.q_proj",
        "layer.v_proj",
    ]


def test_select_modules_strictly_greater():
    ratios = {"layer.down_proj": 1000.0, "layer.o_proj": 1.5}
    assert select_modules(ratios, 1000.0) == []


def test_select_modules_infinite_alpha():
    assert select_modules(module_ratios(hand_scales()), math.inf, MODULE_SITES) == []


def test_select_modules_adds_siblings():
    # Per-module ratios that disagree within a site, with only q and up above alpha.
    ratios = {module: 1.0 for module in MODULE_SITES}
    ratios["layer.q_proj"] = 50.0
    ratios["layer.up_proj"] = 50.0
    assert select_modules(ratios, 10.0, MODULE_SITES) == [
        "layer.gate_proj",
        "layer.k_proj",
        "layer.q_proj",
        "layer.up_proj",
        "layer.v_proj",
    ]


def test_select_modules_without_sites():
    ratios = {module: 1.0 for module in MODULE_SITES}
    ratios["layer.q_proj"] = 50.0
    assert select_modules(ratios, 10.0) == ["layer.q_proj"]


# --- threshold_grid -----------------------------------------------------------------------

GRID_RATIOS = {"a": 100.0, "b": 25.0, "c": 25.0, "d": 4.0, "e": 1.0, "f": math.inf}


@pytest.mark.parametrize(
    ("n_thresholds", "expected"),
    [
        (0, [math.inf]),
        (1, [math.inf, 50.0]),
        (2, [math.inf, 50.0, 10.0]),
        (3, [math.inf, 50.0, 10.0, 2.0]),
        (10, [math.inf, 50.0, 10.0, 2.0]),
    ],
)
def test_threshold_grid_values(n_thresholds, expected):
    # Geometric means of consecutive distinct finite ratios 100, 25, 4, 1.
    assert threshold_grid(GRID_RATIOS, n_thresholds) == pytest.approx(expected)


def test_threshold_grid_excludes_in_turn():
    alphas = threshold_grid(GRID_RATIOS, 3)
    counts = [len(select_modules(GRID_RATIOS, alpha)) for alpha in alphas]
    # The infinite ratio is above every finite alpha, so it joins from the second alpha on.
    assert counts == [0, 2, 4, 5]


def test_threshold_grid_merges_near_ties():
    ratios = {"a": 9.0, "b": 9.0000001, "c": 1.0}
    assert threshold_grid(ratios, 5) == pytest.approx([math.inf, 3.0])


# --- choose_alpha -------------------------------------------------------------------------


def point(alpha: float, n_modules: int, ppl: float) -> dict:
    return {"alpha": alpha, "n_modules": n_modules, "ppl": ppl}


SEARCH_POINTS = [point(math.inf, 0, 20.0), point(50.0, 2, 10.1), point(10.0, 5, 10.0), point(2.0, 9, 10.05)]


@pytest.mark.parametrize(
    ("points", "tolerance", "expected_alpha"),
    [
        # Best 10.0. Within 2 % (<= 10.2) are n=2, 5 and 9, and n=2 has the fewest modules.
        (SEARCH_POINTS, 0.02, 50.0),
        # Zero tolerance keeps only the best point.
        (SEARCH_POINTS, 0.0, 10.0),
        # 0.8 % (<= 10.08) admits n=5 and n=9 but not n=2 (10.1).
        (SEARCH_POINTS, 0.008, 10.0),
        # 100 % admits plain W8A8 (20.0 <= 20.0), which has no full-precision modules.
        (SEARCH_POINTS, 1.0, math.inf),
        # Equal perplexities: the fewest modules wins.
        ([point(math.inf, 0, 7.0), point(3.0, 4, 7.0)], 0.0, math.inf),
        # Same number of modules: the larger alpha wins.
        ([point(math.inf, 0, 30.0), point(30.0, 3, 10.0), point(50.0, 3, 10.0)], 0.02, 50.0),
    ],
    ids=["fewest-within-2pct", "zero-tolerance", "tight-tolerance", "plain-w8a8", "equal-ppl", "tie-larger-alpha"],
)
def test_choose_alpha_cases(points, tolerance, expected_alpha):
    assert choose_alpha(points, tolerance)["alpha"] == expected_alpha


# --- search_threshold ---------------------------------------------------------------------

# Site ratios on the two-layer tiny model. Sites not listed get 1.5.
TINY_SITE_RATIOS = {
    "model.layers.1.down_proj": 100.0,
    "model.layers.0.down_proj": 40.0,
    "model.layers.1.gate_up_proj": 9.0,
}
# Perplexity returned for each number of full-precision modules.
PPL_BY_COUNT = {0: 50.0, 1: 20.0, 2: 12.0, 4: 11.9, 14: 11.8}


def tiny_ratios(model) -> tuple[dict[str, float], dict[str, str]]:
    module_sites = linear_module_sites(model, family_for(model))
    ratios = {module: TINY_SITE_RATIOS.get(site, 1.5) for module, site in module_sites.items()}
    return ratios, module_sites


def full_precision_modules(model) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantLinear) and not module.quantize_input
    }


def run_search(model, alphas, tolerance=0.02):
    quantized = quantize_model(model)
    ratios, module_sites = tiny_ratios(model)
    calls: list[set[str]] = []

    def evaluate(candidate):
        assert candidate is quantized
        selected = full_precision_modules(candidate)
        calls.append(selected)
        return PPL_BY_COUNT[len(selected)]

    result = search_threshold(quantized, ratios, module_sites, alphas, evaluate, tolerance, progress=False)
    return quantized, result, calls


def test_search_records_tradeoff(tiny_model):
    _, result, _ = run_search(tiny_model, [5.0, math.inf, 60.0, 1.2, 50.0, 20.0])
    assert [p["alpha"] for p in result.points] == [math.inf, 60.0, 50.0, 20.0, 5.0, 1.2]
    assert [p["n_modules"] for p in result.points] == [0, 1, 1, 2, 4, 14]
    assert [p["ppl"] for p in result.points] == [50.0, 20.0, 20.0, 12.0, 11.9, 11.8]


def test_search_skips_repeated_selection(tiny_model):
    _, _, calls = run_search(tiny_model, [math.inf, 60.0, 50.0, 20.0, 5.0, 1.2])
    # 60 and 50 both select only layer 1's down_proj, so it is evaluated once.
    assert len(calls) == 5
    assert calls[1] == {"model.layers.1.mlp.down_proj"}


def test_search_evaluates_selected_set(tiny_model):
    _, _, calls = run_search(tiny_model, [math.inf, 60.0, 20.0, 5.0])
    assert calls[0] == set()
    assert calls[2] == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert calls[3] == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    }


def test_search_chooses_fewest_within_tolerance(tiny_model):
    _, result, _ = run_search(tiny_model, [math.inf, 60.0, 50.0, 20.0, 5.0, 1.2])
    # Best 11.8. The limit 1.02 * 11.8 = 12.036 admits 12.0 with 2 modules (alpha 20).
    assert result.alpha == 20.0
    assert result.modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert result.tolerance == 0.02


def test_search_leaves_chosen_set(tiny_model):
    quantized, result, _ = run_search(tiny_model, [math.inf, 60.0, 50.0, 20.0, 5.0, 1.2])
    # The last alpha evaluated (1.2) put all 14 modules in full precision, and the search must undo that.
    assert full_precision_modules(quantized) == set(result.modules)


def test_search_tight_tolerance(tiny_model):
    quantized, result, _ = run_search(tiny_model, [math.inf, 20.0, 5.0, 1.2], tolerance=0.0)
    assert result.alpha == 1.2
    assert len(full_precision_modules(quantized)) == 14


def test_search_rejects_empty_alphas(tiny_model):
    with pytest.raises(ValueError, match="alphas is empty"):
        run_search(tiny_model, [])


def test_search_to_dict_infinite_alpha(tiny_model):
    _, result, _ = run_search(tiny_model, [math.inf, 60.0], tolerance=10.0)
    payload = result.to_dict()
    assert payload["alpha"] is None
    assert payload["points"][0]["alpha"] is None
    assert payload["points"][1]["alpha"] == 60.0
    assert result.alpha == math.inf
