"""Token-wise scale recording: values, shapes, hook cleanup, early stop, save/load and calibrate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from spikelib.architectures import UnsupportedArchitectureError, family_for
from spikelib.calibration import calibrate
from spikelib.hooks import StopForward, TokenScales, forward_until, record_token_scales

# First module of each input site, relative to a decoder layer.
SITE_FIRST_MODULES = {
    "qkv_proj": "self_attn.q_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_proj",
    "down_proj": "mlp.down_proj",
}


def random_ids(n_seq: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def capture_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run one forward pass and return the full input tensor of every site's first module."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for label, module in SITE_FIRST_MODULES.items():
            def hook(_module, args, key=f"model.layers.{index}.{label}"):
                captured[key] = args[0].detach().clone()

            handles.append(layer.get_submodule(module).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_input_scales_match_manual(tiny_model):
    input_ids = random_ids(3, 10)
    inputs = capture_inputs(tiny_model, input_ids)
    with record_token_scales(tiny_model) as recorder, torch.no_grad():
        tiny_model(input_ids=input_ids, use_cache=False)
    scales = recorder.scales()

    assert len(inputs) == 2 * 4
    for site, activation in inputs.items():
        expected = activation.abs().amax(dim=-1)
        assert torch.equal(scales[site], expected), site


def test_hidden_scales_match_hidden_states(tiny_model_3layers):
    model = tiny_model_3layers
    input_ids = random_ids(2, 9)
    with record_token_scales(model) as recorder, torch.no_grad():
        output = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    scales = recorder.scales()

    # hidden_states[0] is the embedding output and hidden_states[i + 1] the output of layer i,
    # except the last entry, to which transformers 5.25 has already applied the final norm.
    assert len(output.hidden_states) == 4
    for index in range(2):
        expected = output.hidden_states[index + 1].abs().amax(dim=-1)
        assert torch.equal(scales[f"model.layers.{index}.hidden"], expected), index


def test_last_hidden_scale_before_final_norm(tiny_model_3layers):
    model = tiny_model_3layers
    input_ids = random_ids(2, 9)
    norm_inputs = []
    handle = model.model.norm.register_forward_pre_hook(lambda module, args: norm_inputs.append(args[0].clone()))
    try:
        with record_token_scales(model) as recorder, torch.no_grad():
            output = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    finally:
        handle.remove()
    recorded = recorder.scales()["model.layers.2.hidden"]

    assert torch.equal(recorded, norm_inputs[0].abs().amax(dim=-1))
    # The normed last entry of hidden_states is not what the recorder stores.
    assert not torch.allclose(recorded, output.hidden_states[-1].abs().amax(dim=-1))


def test_scales_shape_two_passes(tiny_model):
    with record_token_scales(tiny_model) as recorder, torch.no_grad():
        tiny_model(input_ids=random_ids(2, 7, seed=1), use_cache=False)
        tiny_model(input_ids=random_ids(3, 7, seed=2), use_cache=False)
    scales = recorder.scales()

    assert len(scales) == 2 * 5
    for site, values in scales.items():
        assert values.shape == (5, 7), site
        assert values.dtype == torch.float32, site


def test_scales_concatenate_in_order(tiny_model):
    first, second = random_ids(2, 6, seed=1), random_ids(1, 6, seed=2)
    with record_token_scales(tiny_model) as recorder, torch.no_grad():
        tiny_model(input_ids=first, use_cache=False)
        tiny_model(input_ids=second, use_cache=False)
    with record_token_scales(tiny_model) as single, torch.no_grad():
        tiny_model(input_ids=second, use_cache=False)
    site = "model.layers.1.down_proj"
    assert torch.equal(recorder.scales()[site][2:], single.scales()[site])


def test_site_names(tiny_model):
    with record_token_scales(tiny_model) as recorder, torch.no_grad():
        tiny_model(input_ids=random_ids(1, 4), use_cache=False)
    expected = {
        f"model.layers.{index}.{label}"
        for index in range(2)
        for label in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "hidden")
    }
    assert set(recorder.scales()) == expected


def test_siblings_recorded_once(tiny_model):
    with record_token_scales(tiny_model) as recorder:
        layer = tiny_model.model.layers[0]
        attached = {
            name: len(layer.get_submodule(name)._forward_pre_hooks)
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        }
        with torch.no_grad():
            tiny_model(input_ids=random_ids(1, 4), use_cache=False)
        record_counts = recorder.passes()

    assert attached == {
        "self_attn.q_proj": 1,
        "self_attn.k_proj": 0,
        "self_attn.v_proj": 0,
        "mlp.gate_proj": 1,
        "mlp.up_proj": 0,
    }
    assert record_counts["model.layers.0.qkv_proj"] == 1
    assert record_counts["model.layers.0.gate_up_proj"] == 1


def test_module_sites_map_siblings(tiny_model):
    with record_token_scales(tiny_model) as recorder:
        module_sites = dict(recorder.module_sites)
    assert len(module_sites) == 2 * 7
    for module in ("q_proj", "k_proj", "v_proj"):
        assert module_sites[f"model.layers.1.self_attn.{module}"] == "model.layers.1.qkv_proj"
    for module in ("gate_proj", "up_proj"):
        assert module_sites[f"model.layers.1.mlp.{module}"] == "model.layers.1.gate_up_proj"
    assert module_sites["model.layers.1.self_attn.o_proj"] == "model.layers.1.o_proj"
    assert module_sites["model.layers.1.mlp.down_proj"] == "model.layers.1.down_proj"


def test_hooks_removed_after_block(tiny_model):
    baseline = hook_count(tiny_model)
    with record_token_scales(tiny_model):
        inside = hook_count(tiny_model)
    # Per layer: one pre-hook for each of the 4 sites, and a pre-hook and a forward hook on the layer.
    assert inside == baseline + 2 * 6
    assert hook_count(tiny_model) == baseline


def test_hooks_removed_after_exception(tiny_model):
    baseline = hook_count(tiny_model)
    with pytest.raises(RuntimeError, match="inside the block"):
        with record_token_scales(tiny_model):
            raise RuntimeError("inside the block")
    assert hook_count(tiny_model) == baseline


def test_stop_after_layer_skips_later(tiny_model_3layers):
    model = tiny_model_3layers
    with record_token_scales(model, stop_after_layer=0) as recorder, torch.no_grad():
        forward_until(model, random_ids(2, 5))
    scales = recorder.scales()

    assert set(scales) == {f"model.layers.0.{label}" for label in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "hidden")}
    for index in (1, 2):
        assert recorder.passes()[f"model.layers.{index}.qkv_proj"] == 0, index


def test_stop_after_layer_same_values(tiny_model_3layers):
    model = tiny_model_3layers
    input_ids = random_ids(2, 5)
    with record_token_scales(model, stop_after_layer=1) as early, torch.no_grad():
        forward_until(model, input_ids)
    with record_token_scales(model) as full, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    assert torch.equal(early.scales()["model.layers.1.down_proj"], full.scales()["model.layers.1.down_proj"])


def test_stop_forward_raised_without_helper(tiny_model):
    with record_token_scales(tiny_model, stop_after_layer=0), torch.no_grad():
        with pytest.raises(StopForward):
            tiny_model(input_ids=random_ids(1, 4), use_cache=False)


def test_record_rejects_unknown_family(tiny_model):
    tiny_model.config.model_type = "bloom"
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'"):
        with record_token_scales(tiny_model):
            pass


# --- TokenScales --------------------------------------------------------------------------


def test_token_scales_round_trip(tmp_path, tiny_model):
    windows = random_ids(3, 6)
    scales = calibrate(tiny_model, windows, batch_size=2, progress=False)
    path = tmp_path / "nested" / "scales.pt"
    scales.save(path)
    loaded = TokenScales.load(path)

    assert loaded.scales.keys() == scales.scales.keys()
    for site, values in scales.scales.items():
        assert torch.equal(loaded.scales[site], values), site
    assert torch.equal(loaded.token_ids, scales.token_ids)
    assert loaded.module_sites == scales.module_sites
    assert loaded.site_layers == scales.site_layers
    assert loaded.metadata == scales.metadata
    assert [p.name for p in path.parent.iterdir()] == ["scales.pt"]


def test_token_scales_site_max():
    scales = TokenScales(
        scales={"a": torch.tensor([[1.0, 7.0], [3.0, 2.0]]), "b": torch.tensor([[0.5]])},
        token_ids=torch.zeros(2, 2, dtype=torch.long),
        module_sites={},
        site_layers={},
    )
    assert scales.site_max() == {"a": 7.0, "b": 0.5}


# --- calibrate ----------------------------------------------------------------------------


def test_calibrate_metadata(tiny_model):
    windows = random_ids(5, 6)
    scales = calibrate(tiny_model, windows, batch_size=2, progress=False)
    assert scales.metadata == {"n_windows": 5, "seq_len": 6, "family": "llama"}
    assert torch.equal(scales.token_ids, windows)
    assert scales.token_ids.data_ptr() != windows.data_ptr()


def test_calibrate_site_layers(tiny_model):
    scales = calibrate(tiny_model, random_ids(2, 4), progress=False)
    assert scales.site_layers["model.layers.1.down_proj"] == (1, "down_proj")
    assert scales.site_layers["model.layers.0.hidden"] == (0, "hidden")
    assert scales.module_sites["model.layers.0.self_attn.v_proj"] == "model.layers.0.qkv_proj"


def test_calibrate_batches_agree(tiny_model):
    windows = random_ids(5, 6)
    batched = calibrate(tiny_model, windows, batch_size=2, progress=False)
    whole = calibrate(tiny_model, windows, batch_size=5, progress=False)
    for site, values in whole.scales.items():
        assert batched.scales[site].shape == (5, 6), site
        torch.testing.assert_close(batched.scales[site], values, rtol=1e-5, atol=1e-6)


def test_calibrate_matches_manual(tiny_model):
    windows = random_ids(2, 6)
    scales = calibrate(tiny_model, windows, batch_size=2, progress=False)
    inputs = capture_inputs(tiny_model, windows)
    expected = inputs["model.layers.1.gate_up_proj"].abs().amax(dim=-1)
    assert torch.equal(scales.scales["model.layers.1.gate_up_proj"], expected)


def test_calibrate_leaves_no_hooks(tiny_model):
    baseline = hook_count(tiny_model)
    calibrate(tiny_model, random_ids(2, 4), progress=False)
    assert hook_count(tiny_model) == baseline


def test_family_for_rejects_unknown(tiny_model):
    tiny_model.config.model_type = "bloom"
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'") as raised:
        family_for(tiny_model)
    message = str(raised.value)
    for model_type in ("falcon", "gemma3_text", "gpt2", "llama", "mixtral", "mpt", "opt", "phi3", "qwen2"):
        assert model_type in message
    assert "spikelib.architectures.FAMILIES" in message


def test_recorder_grows_past_capacity(tiny_model):
    first, second = random_ids(2, 5), random_ids(3, 5)
    with record_token_scales(tiny_model, capacity=1) as small, torch.no_grad():
        tiny_model(input_ids=first, use_cache=False)
        tiny_model(input_ids=second, use_cache=False)
    with record_token_scales(tiny_model) as reference, torch.no_grad():
        tiny_model(input_ids=torch.cat([first, second]), use_cache=False)

    grown, expected = small.scales(), reference.scales()
    for site in expected:
        assert grown[site].shape == (5, 5), site
        assert torch.allclose(grown[site], expected[site], rtol=1e-5, atol=1e-6), site


def test_recorder_rejects_mixed_lengths(tiny_model):
    with record_token_scales(tiny_model) as recorder, torch.no_grad():
        tiny_model(input_ids=random_ids(1, 5), use_cache=False)
        with pytest.raises(ValueError, match="one length per recorder"):
            tiny_model(input_ids=random_ids(1, 6), use_cache=False)
    assert recorder.passes()["model.layers.0.qkv_proj"] == 1


def test_saved_scales_bytes_reproducible(tiny_model, tmp_path):
    scales = calibrate(tiny_model, random_ids(2, 5), progress=False)
    scales.save(tmp_path / "first.pt")
    scales.save(tmp_path / "second.pt")
    assert (tmp_path / "first.pt").read_bytes() == (tmp_path / "second.pt").read_bytes()
