"""Every family of the architecture table on tiny random models built from transformers config classes.

For each family, the hooks find exactly the expected input sites and modules, whose names are
written out here rather than read from the table, and their scales equal hand-hooked inputs.
Quantization replaces every decoder linear layer and nothing else. QFeM keeps siblings and fused
modules together. A QFeP prefix cache gives the same logits as running the prefix and the window
at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers

from spikelib import models, qfem, qfep, quantizers
from spikelib.architectures import FAMILIES, decoder_layers, family_for, linear_module_sites, prepare_model
from spikelib.calibration import calibrate
from spikelib.experts import LinearExperts
from spikelib.hooks import record_token_scales

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LLAMA_MODULES = {
    "qkv_proj": QKV,
    "o_proj": ["self_attn.o_proj"],
    "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "down_proj": ["mlp.down_proj"],
}

# family -> (config class, config arguments, {site label: module paths in the layer})
CASES = {
    "llama": (transformers.LlamaConfig, LLAMA_LIKE, LLAMA_MODULES),
    "mistral": (transformers.MistralConfig, LLAMA_LIKE, LLAMA_MODULES),
    "qwen2": (transformers.Qwen2Config, LLAMA_LIKE, LLAMA_MODULES),
    "qwen3": (transformers.Qwen3Config, dict(LLAMA_LIKE, head_dim=8), LLAMA_MODULES),
    "mixtral": (
        transformers.MixtralConfig,
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        {
            "qkv_proj": QKV,
            "o_proj": ["self_attn.o_proj"],
            "experts.gate_up_proj": [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")],
            "experts.down_proj": [f"mlp.experts.{e}.down_proj" for e in range(4)],
        },
    ),
    "phi3": (
        transformers.Phi3Config,
        LLAMA_LIKE,
        {"qkv_proj": ["self_attn.qkv_proj"], "o_proj": ["self_attn.o_proj"],
         "gate_up_proj": ["mlp.gate_up_proj"], "down_proj": ["mlp.down_proj"]},
    ),
    "olmo": (transformers.OlmoConfig, LLAMA_LIKE, LLAMA_MODULES),
    "olmo2": (transformers.Olmo2Config, LLAMA_LIKE, LLAMA_MODULES),
    "gemma": (transformers.GemmaConfig, dict(LLAMA_LIKE, head_dim=8), LLAMA_MODULES),
    "gemma2": (transformers.Gemma2Config, dict(LLAMA_LIKE, head_dim=8), LLAMA_MODULES),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(LLAMA_LIKE, head_dim=8), LLAMA_MODULES),
    "gpt2": (
        transformers.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=4),
        {"c_attn": ["attn.c_attn"], "attn_c_proj": ["attn.c_proj"], "c_fc": ["mlp.c_fc"], "mlp_c_proj": ["mlp.c_proj"]},
    ),
    "opt": (
        transformers.OPTConfig,
        dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
        {"qkv_proj": QKV, "out_proj": ["self_attn.out_proj"], "fc1": ["fc1"], "fc2": ["fc2"]},
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
        {"query_key_value": ["attention.query_key_value"], "dense": ["attention.dense"],
         "dense_h_to_4h": ["mlp.dense_h_to_4h"], "dense_4h_to_h": ["mlp.dense_4h_to_h"]},
    ),
    "falcon": (
        transformers.FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        {"qkv_h_to_4h": ["self_attention.query_key_value", "mlp.dense_h_to_4h"],
         "dense": ["self_attention.dense"], "dense_4h_to_h": ["mlp.dense_4h_to_h"]},
    ),
    "falcon_two_norms": (
        transformers.FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
        {"query_key_value": ["self_attention.query_key_value"], "dense_h_to_4h": ["mlp.dense_h_to_4h"],
         "dense": ["self_attention.dense"], "dense_4h_to_h": ["mlp.dense_4h_to_h"]},
    ),
    "falcon_sequential": (
        transformers.FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, parallel_attn=False),
        {"query_key_value": ["self_attention.query_key_value"], "dense_h_to_4h": ["mlp.dense_h_to_4h"],
         "dense": ["self_attention.dense"], "dense_4h_to_h": ["mlp.dense_4h_to_h"]},
    ),
    "phi": (
        transformers.PhiConfig,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
        {"qkv_fc1": QKV + ["mlp.fc1"], "dense": ["self_attn.dense"], "fc2": ["mlp.fc2"]},
    ),
    "mpt": (
        transformers.MptConfig,
        dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2),
        {"Wqkv": ["attn.Wqkv"], "out_proj": ["attn.out_proj"], "up_proj": ["ffn.up_proj"], "down_proj": ["ffn.down_proj"]},
    ),
}
EXPECTED_FAMILY = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "gemma2"}


def build(case: str, seed: int = 0) -> nn.Module:
    config_class, arguments, _ = CASES[case]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**COMMON, **arguments))
    # Random weights of a useful size: default initializers leave some layers at zero.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def decoder_linear_names(model: nn.Module) -> set[str]:
    """Every nn.Linear or Conv1D inside the decoder layers, found by type, not by the table."""
    family = family_for(model)
    return {
        f"{family.layers}.{index}.{name}"
        for index, layer in enumerate(decoder_layers(model, family))
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


def test_every_family_is_tested():
    tested = {family_for(build(case)).name for case in CASES}
    assert tested == set(FAMILIES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_lookup(case):
    expected = EXPECTED_FAMILY.get(case, case)
    assert family_for(build(case)).name == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_hooks_find_expected_modules(case):
    model = build(case)
    family = family_for(model)
    expected_sites = CASES[case][2]
    with record_token_scales(model) as recorder, torch.no_grad():
        model(input_ids=ids(2, 7), use_cache=False)
    scales = recorder.scales()
    n_layers = len(decoder_layers(model, family))
    labels = list(expected_sites) + ["hidden"]
    assert set(scales) == {f"{family.layers}.{i}.{label}" for i in range(n_layers) for label in labels}
    assert all(values.shape == (2, 7) for values in scales.values())
    expected_modules = {
        f"{family.layers}.{i}.{module}": f"{family.layers}.{i}.{label}"
        for i in range(n_layers)
        for label, modules in expected_sites.items()
        for module in modules
    }
    assert recorder.module_sites == expected_modules
    assert linear_module_sites(model, family) == expected_modules


@pytest.mark.parametrize("case", sorted(set(CASES) - {"mixtral"}))
def test_scales_equal_module_inputs(case):
    model = build(case)
    family = family_for(model)
    inputs = {}
    handles = []
    for label, modules in CASES[case][2].items():
        for module in modules:
            name = f"{family.layers}.1.{module}"

            def hook(_, args, name=name):
                inputs[name] = args[0].detach().abs().amax(dim=-1)

            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with record_token_scales(model) as recorder, torch.no_grad():
        model(input_ids=ids(2, 6), use_cache=False)
    for handle in handles:
        handle.remove()
    scales = recorder.scales()
    for label, modules in CASES[case][2].items():
        for module in modules:  # siblings read the same tensor, so each equals the site's scale
            recorded = scales[f"{family.layers}.1.{label}"]
            torch.testing.assert_close(recorded, inputs[f"{family.layers}.1.{module}"].reshape(recorded.shape))


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantization_wraps_decoder_linears_only(case):
    model = build(case)
    prepare_model(model)
    expected = decoder_linear_names(model)
    quantized = quantizers.quantize_model(model)
    wrapped = {name for name, module in quantized.named_modules() if isinstance(module, quantizers.FakeQuantLinear)}
    assert wrapped == expected
    assert decoder_linear_names(quantized) == set()
    # Embeddings and the output head stay as they were.
    assert isinstance(quantized.get_output_embeddings(), nn.Linear)
    with torch.no_grad():
        reference = model(input_ids=ids(1, 8)).logits
        output = quantized(input_ids=ids(1, 8)).logits
    assert torch.isfinite(output).all()
    assert not torch.equal(output, reference)
    relative = (output - reference).norm() / reference.norm()
    assert relative < 0.2, f"W8A8 moved the logits by {relative:.3f} of their norm"


@pytest.mark.parametrize("case", ["llama", "phi3", "falcon", "phi", "mixtral", "gpt2"])
def test_qfem_keeps_siblings_together(case):
    model = build(case)
    scales = calibrate(model, ids(3, 8), batch_size=3, progress=False)
    ratios = qfem.module_ratios(scales)
    family = family_for(model)
    for label, modules in CASES[case][2].items():
        site = f"{family.layers}.0.{label}"
        names = [f"{family.layers}.0.{module}" for module in modules]
        # Choose alpha so that only this site's ratio passes.
        alpha = ratios[names[0]] - 1e-6
        selected = set(qfem.select_modules({name: ratios[name] for name in names[:1]}, alpha, scales.module_sites))
        assert selected == set(names), site
    quantized = quantizers.quantize_model(model, full_precision_inputs=qfem.select_modules(ratios, 0.0, scales.module_sites))
    assert not any(m.quantize_input for m in quantized.modules() if isinstance(m, quantizers.FakeQuantLinear))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_start", [True, False])
def test_prefix_cache_matches_joint_pass(case, with_start):
    """QFeP on models with and without a start token: the cached prefix gives the logits of one joint pass."""
    model = build(case)
    prefix_ids = [1, 17, 23] if with_start else [17, 23, 40]
    window = ids(1, 6)
    cache = qfep.PrefixCache(model, prefix_ids)
    with torch.no_grad():
        joint = model(input_ids=torch.cat([torch.tensor([prefix_ids]), window], dim=1)).logits[:, len(prefix_ids):]
        cached = model(input_ids=window, **cache.forward_kwargs()).logits
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-4)
    assert len(cache) == 3


def test_mixtral_unfolding_keeps_outputs():
    model = build("mixtral")
    with torch.no_grad():
        reference = model(input_ids=ids(2, 9)).logits
        prepare_model(model)
        prepare_model(model)  # twice changes nothing
        output = model(input_ids=ids(2, 9)).logits
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, LinearExperts) and len(experts) == 4
    # The router stays a full-precision router.
    quantized = quantizers.quantize_model(model)
    assert type(quantized.get_submodule("model.layers.0.mlp.gate")).__name__ == "MixtralTopKRouter"


def test_mixtral_expert_scales_token_positions():
    model = build("mixtral")
    prepare_model(model)
    batch = ids(2, 9)
    router_choice, down_inputs = {}, {}
    block = model.get_submodule("model.layers.1.mlp")
    router_choice_hook = block.gate.register_forward_hook(lambda m, a, out: router_choice.update(index=out[2]))
    handles = [router_choice_hook]
    for e in range(4):
        def hook(module, args, e=e):
            down_inputs[e] = args[0].detach().abs().amax(dim=-1)

        handles.append(model.get_submodule(f"model.layers.1.mlp.experts.{e}.down_proj").register_forward_pre_hook(hook))
    with record_token_scales(model) as recorder, torch.no_grad():
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()

    # By hand: each token's scale is the largest over the experts its router chose.
    index = router_choice["index"]  # (tokens, top_k)
    expected = torch.zeros(index.shape[0])
    for e in range(4):
        tokens = (index == e).any(dim=-1).nonzero().flatten()
        if tokens.numel():
            expected[tokens] = torch.maximum(expected[tokens], down_inputs[e])
    recorded = recorder.scales()["model.layers.1.experts.down_proj"]
    torch.testing.assert_close(recorded, expected.reshape(2, 9))
    assert (recorded > 0).all()
    # The gate/up input of every expert is the block input, so its scale is the norm output's.
    gate_up = recorder.scales()["model.layers.1.experts.gate_up_proj"]
    assert (gate_up > 0).all()


def test_mixtral_qfem_excludes_all_experts():
    model = build("mixtral")
    scales = calibrate(model, ids(2, 8), batch_size=2, progress=False)
    ratios = qfem.module_ratios(scales)
    first = "model.layers.0.mlp.experts.0.down_proj"
    chosen = qfem.select_modules({first: ratios[first]}, ratios[first] - 1e-6, scales.module_sites)
    assert sorted(chosen) == [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4)]
    quantized = quantizers.quantize_model(model, full_precision_inputs=chosen)
    keep = {name for name, m in quantized.named_modules() if isinstance(m, quantizers.FakeQuantLinear) and not m.quantize_input}
    assert keep == set(chosen)


def test_conv1d_weight_transposed():
    model = build("gpt2")
    conv = model.get_submodule("transformer.h.0.mlp.c_fc")
    fake = quantizers.FakeQuantLinear.from_float(conv, quantizers.QuantConfig())
    x = torch.randn(3, conv.weight.shape[0])
    fake.quantize_input = False
    torch.testing.assert_close(fake(x), conv(x), rtol=0.02, atol=0.02)
    assert fake.weight.shape == (conv.nf, conv.weight.shape[0])


# --- numerical range -------------------------------------------------------------------------


def overflowing_gemma3(dtype: torch.dtype) -> nn.Module:
    # Gemma-3 scales each block's output by a (1 + w) norm before adding it to the residual
    # stream, so a large w there pushes the stream past 65,504.
    model = build("gemma3_text")
    with torch.no_grad():
        model.get_submodule("model.layers.0.post_feedforward_layernorm").weight.fill_(4e4)
    return model.to(dtype)


def test_float16_overflow_is_reported():
    model = overflowing_gemma3(torch.float16)
    assert models.install_overflow_check(model) == 2
    with pytest.raises(models.ActivationOverflowError, match=r"model\.layers\.0.*float16.*65504.*float32 or bfloat16"):
        with torch.no_grad():
            model(input_ids=ids(1, 6))


def test_same_model_in_float32_is_finite():
    model = overflowing_gemma3(torch.float32)
    models.install_overflow_check(model)
    with torch.no_grad():
        logits = model(input_ids=ids(1, 6)).logits
    assert torch.isfinite(logits).all()
    hidden = model(input_ids=ids(1, 6), output_hidden_states=True).hidden_states[1]
    assert hidden.abs().max() > torch.finfo(torch.float16).max  # it would overflow float16


def test_overflow_check_survives_quantization():
    model = overflowing_gemma3(torch.float16)
    models.install_overflow_check(model)
    models.install_overflow_check(model)  # once per layer, however often it is called
    assert len(model.get_submodule("model.layers.0")._forward_hooks) == 1
    quantized = quantizers.quantize_model(model)
    with pytest.raises(models.ActivationOverflowError):
        with torch.no_grad():
            quantized(input_ids=ids(1, 6))


def test_overflow_check_skips_unknown():
    model = build("llama")
    model.config.model_type = "bloom"
    assert models.install_overflow_check(model) == 0
