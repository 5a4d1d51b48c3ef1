"""Adapters on tiny random LLaMAs: identity at init, equivalences with LoRA and PEFT, save/load, priors."""

import json

import pytest
import torch

import rexft
from conftest import randomize_adapters as randomize
from conftest import tiny_model
from rexft.adapters import adapter_layers, adapter_types, is_adapter_param, routing_stats, set_token_mask
from rexft.config import AdapterConfig
from rexft.errors import RexftError
from rexft.train import enable_checkpointing

K = 8
IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def cfg(kind, **kw):
    return AdapterConfig(type=kind, dropout=0.0, prior_dim=K, **kw)


def logits(model, prior=None, ids=IDS):
    rexft.set_prior(model, prior)
    with torch.no_grad():
        return model(input_ids=ids).logits


PRIOR = torch.rand(2, K)


@pytest.mark.parametrize("kind", adapter_types())
def test_identity_at_init_and_only_adapters_train(kind):
    model = tiny_model()
    reference = logits(model)
    rexft.inject_adapters(model, cfg(kind))
    assert torch.equal(logits(model, PRIOR), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if is_adapter_param(n)} and trainable
    assert "lm_head" not in " ".join(adapter_layers(model))
    assert len(adapter_layers(model)) == 2 * 7  # every linear of both blocks


def test_wraps_the_base_linear_without_copying():
    model = tiny_model()
    q = model.model.layers[0].self_attn.q_proj
    rexft.inject_adapters(model, cfg("lora"))
    assert model.model.layers[0].self_attn.q_proj.base is q


def lora_with(model_lora, A, B):
    layer_names = list(adapter_layers(model_lora))
    with torch.no_grad():
        for name in layer_names:
            layer = model_lora.get_submodule(name)
            layer.rex_A.copy_(A[name])
            layer.rex_B.copy_(B[name])
    return model_lora


def test_trex_with_identity_routing_equals_lora():
    """rank1 mode, zero router, no prior: M = diag(omega * c_token / r), gate = 1/2, so delta = s B A x
    with s = gate * omega * c_token / r: LoRA with alpha = s * r."""
    r = 4
    trex = randomize(rexft.inject_adapters(tiny_model(), cfg("trex", mode="rank1", r=r, use_prior=False)))
    with torch.no_grad():
        for layer in adapter_layers(trex).values():
            layer.rex_router.weight.zero_()
            layer.rex_router.bias.zero_()
            layer.rex_w_omega.zero_()
            layer.rex_w_gate.zero_()
    scale = 0.5 * 0.5 * 32.0 / r
    lora = rexft.inject_adapters(tiny_model(), cfg("lora", r=r, alpha=scale * r))
    layers = adapter_layers(trex)
    lora_with(lora, {n: l.rex_A for n, l in layers.items()}, {n: l.rex_B for n, l in layers.items()})
    torch.testing.assert_close(logits(trex), logits(lora), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mode", "molora", "hydralora"])
def test_single_expert_mixture_equals_lora(kind):
    mixture = randomize(rexft.inject_adapters(tiny_model(), cfg(kind, r=4, alpha=8, num_experts=1)))
    lora = rexft.inject_adapters(tiny_model(), cfg("lora", r=4, alpha=8))
    layers = adapter_layers(mixture)
    lora_with(lora, {n: l.rex_A for n, l in layers.items()}, {n: l.rex_B for n, l in layers.items()})
    torch.testing.assert_close(logits(mixture), logits(lora), rtol=1e-5, atol=1e-5)


def test_lora_equals_peft_lora_with_the_same_weights():
    from peft import LoraConfig, get_peft_model

    ours = randomize(rexft.inject_adapters(tiny_model(), cfg("lora", r=4, alpha=8)))
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.rex_A)
            target.lora_B["default"].weight.copy_(layer.rex_B)
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", adapter_types())
def test_save_load_reproduces_logits_exactly(kind, tmp_path):
    model = randomize(rexft.inject_adapters(tiny_model(), cfg(kind)))
    rexft.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["type"] == kind and config["base_model"]["hidden_size"] == 64
    fresh = rexft.load_adapter(tiny_model(), tmp_path / "adapter")
    assert torch.equal(logits(fresh, PRIOR), logits(model, PRIOR))
    assert set(rexft.adapter_state_dict(fresh)) == set(rexft.adapter_state_dict(model))


def test_loading_onto_a_different_base_is_one_clear_error(tmp_path):
    model = rexft.inject_adapters(tiny_model(), cfg("lora"))
    rexft.save_adapter(model, tmp_path / "a")
    with pytest.raises(RexftError, match=r"different base model \(num_hidden_layers: adapter 2 vs model 3\)"):
        rexft.load_adapter(tiny_model(layers=3), tmp_path / "a")


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = rexft.inject_adapters(tiny_model(), cfg("lora", r=4))
    rexft.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = "model.layers.0.self_attn.q_proj.rex_A"
    tensors.pop(dropped)
    tensors["model.layers.1.mlp.up_proj.rex_B"] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(RexftError, match=r"missing \['model.layers.0.self_attn.q_proj.rex_A'\].*mis-shaped \['model.layers.1.mlp.up_proj.rex_B \(3, 3\)"):
        rexft.load_adapter(tiny_model(), tmp_path / "a")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(RexftError, match="missing or corrupt"):
        rexft.load_adapter(tiny_model(), tmp_path / "a")


@pytest.mark.parametrize("kind", ["trex", "mode"])
def test_gradients_with_checkpointing_equal_gradients_without(kind):
    def grads(checkpointing):
        model = randomize(rexft.inject_adapters(tiny_model(), cfg(kind)))
        model.train()
        if checkpointing:
            enable_checkpointing(model)
        rexft.set_prior(model, PRIOR)
        model(input_ids=IDS).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    if kind == "trex":
        assert any("prior_proj" in n for n in plain)  # the prior path is trained
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


class NotALinear(torch.nn.Linear):
    """A base that is not exactly nn.Linear: the adapter must not add its delta in place."""


class DoubleOutput(torch.nn.Linear):
    """A base whose output dtype differs from the adapter's (as a bf16 4-bit base under fp32 adapters)."""

    def forward(self, x):
        return super().forward(x).double()


@pytest.mark.parametrize("kind", adapter_types())
@pytest.mark.parametrize("base", ["linear", "other", "unfused"])
def test_fused_up_projection_matches_the_stated_math(kind, base):
    """y = base(x) + B z(x): the in-place addmm (nn.Linear base), the out-of-place addmm (any other base)
    and the unfused fallback (dtype mismatch) give the same outputs and gradients."""
    torch.manual_seed(0)
    linear = {"linear": torch.nn.Linear, "other": NotALinear, "unfused": DoubleOutput}[base](16, 24)
    layer = rexft.adapters.adapter_class(kind)(linear, cfg(kind))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    layer.prior = PRIOR
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = linear(expected_x).float() + torch.nn.functional.linear(layer.coefficients(expected_x), layer.rex_B)
    expected.pow(2).sum().backward()
    reference = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    out = layer(x)
    assert out.dtype == (torch.float64 if base == "unfused" else torch.float32)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)
    for name, grad in reference.items():
        torch.testing.assert_close(dict(layer.named_parameters())[name].grad.float(), grad, rtol=1e-4, atol=1e-5)


def test_prior_changes_trex_output_and_reaches_generate():
    model = randomize(rexft.inject_adapters(tiny_model(), cfg("trex")))
    assert not torch.allclose(logits(model, PRIOR), logits(model, torch.rand(2, K)))
    rexft.set_prior(model, PRIOR[:1])
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    assert out.shape == (2, 16)
    rexft.set_prior(model, None)
    with pytest.raises(RexftError, match="got no prior"):
        model(input_ids=IDS)


def test_prior_per_token_for_packed_rows():
    model = randomize(rexft.inject_adapters(tiny_model(), cfg("trex")))
    per_example = logits(model, PRIOR)
    per_token = logits(model, PRIOR[:, None, :].expand(2, IDS.shape[1], K))
    torch.testing.assert_close(per_token, per_example)


def test_trex_prior_used_directly_when_k_equals_experts():
    model = rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", r1=2, r2=4, prior_dim=8))
    assert all(l.rex_prior_proj is None for l in adapter_layers(model).values())
    with pytest.raises(RexftError, match="expects a prior of size 8"):
        logits(randomize(model), torch.rand(2, 5))


@pytest.mark.parametrize("kind", ["trex", "molora", "mode"])
def test_top_k_routing_keeps_k_experts(kind):
    model = randomize(rexft.inject_adapters(tiny_model(), cfg(kind, top_k=2, use_prior=False)))
    layer = next(iter(adapter_layers(model).values()))
    layer.route_log = []
    set_token_mask(model, torch.ones_like(IDS))
    logits(model)
    from rexft.adapters.base import sparse_softmax

    probs = sparse_softmax(torch.randn(5, 7), 2)
    assert ((probs > 0).sum(-1) == 2).all() and torch.allclose(probs.sum(-1), torch.ones(5))
    assert routing_stats(model)


def test_trex_ablations_router_off_and_prior_off():
    prior_only = randomize(rexft.inject_adapters(tiny_model(), cfg("trex", use_router=False)))
    assert all(l.rex_router is None for l in adapter_layers(prior_only).values())
    assert logits(prior_only, PRIOR).isfinite().all()
    no_prior = randomize(rexft.inject_adapters(tiny_model(), cfg("trex", use_prior=False)))
    assert torch.equal(logits(no_prior, PRIOR), logits(no_prior, torch.rand(2, K)))
    with pytest.raises(RexftError, match="needs adapter.use_router or adapter.use_prior"):
        rexft.inject_adapters(tiny_model(), cfg("trex", use_router=False, use_prior=False))


def test_balance_loss_is_one_at_uniform_routing():
    model = rexft.inject_adapters(tiny_model(), cfg("molora", aux_loss_weight=1.0))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.rex_router.weight.zero_()  # zero logits: uniform routing
            layer.rex_router.bias.zero_()
    logits(model)
    from rexft.adapters import aux_loss

    assert float(aux_loss(model)) == pytest.approx(len(adapter_layers(model)))


def test_parameter_report_trex_has_30_to_40_percent_fewer_than_lora_r32():
    """The T-REX claim on square layers: (r1 + r1*r2) * in + r2 * out vs 32 * (in + out)."""
    from rexft.config import ModelConfig, TinyModelConfig
    from rexft.modeling import tiny_llama

    square = tiny_llama(ModelConfig(tiny=TinyModelConfig(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                                                         num_key_value_heads=4)), 259)
    rexft.inject_adapters(square, AdapterConfig(type="trex", r1=4, r2=8, prior_dim=32))
    report = rexft.parameter_report(square)
    assert 0.6 <= report["ratio_vs_lora_r32"] <= 0.7
    assert set(report["per_module_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_injection_accepts_a_yaml_shaped_dict_and_rejects_unknown_keys():
    model = rexft.inject_adapters(tiny_model(), {"type": "mode", "r": 4, "num_experts": 6})
    assert len(adapter_layers(model)) == 14
    with pytest.raises(ValueError, match="unknown adapter config key"):
        rexft.inject_adapters(tiny_model(), {"type": "mode", "rank": 4})


def tiny_arch(name):
    import transformers

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
        "phi": ("PhiConfig", "PhiForCausalLM", {}),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    }
    config_cls, model_cls, extra = configs[name]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common, **extra)).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi", "gpt_neox"])
@pytest.mark.parametrize("kind", ["trex", "mode"])
def test_any_causal_lm_architecture(arch, kind):
    model = tiny_arch(arch)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    rexft.inject_adapters(model, AdapterConfig(type=kind, prior_dim=K, dropout=0.0))
    layers = adapter_layers(model)
    head = model.get_output_embeddings()
    assert layers and all(layer.base is not head for layer in layers.values())
    rexft.set_prior(model, PRIOR)
    assert torch.equal(model(input_ids=ids).logits.detach(), reference)
    randomize(model)
    model(input_ids=ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "prior_proj" not in n)


def test_injected_layers_follow_the_models_train_or_eval_mode():
    evaluating = rexft.inject_adapters(tiny_model().eval(), AdapterConfig(type="trex", prior_dim=K, dropout=0.5))
    assert not any(m.training for m in evaluating.modules())
    training = rexft.inject_adapters(tiny_model().train(), AdapterConfig(type="trex", prior_dim=K, dropout=0.5))
    assert all(layer.training for layer in adapter_layers(training).values())


def test_lane_dropout_is_dropout_with_rate_p_on_every_lane():
    """LaneDropout: y = x * keep / (1 - p), the same keep in the backward, P(drop) = p on each of the four
    16-bit lanes of a random draw, reproducible under torch.manual_seed, the identity in eval mode."""
    from rexft.adapters.base import LaneDropout

    dropout = LaneDropout(0.1).train()
    x = torch.randn(64, 128, 96, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x)
    keep = y.detach() != 0
    torch.testing.assert_close(y, x * keep / 0.9)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep / 0.9)
    dropped = 1 - keep.reshape(-1, 4).float().mean(0)  # lane i of each int64 draw is element 4 * j + i
    assert torch.allclose(dropped, torch.full((4,), 0.1), atol=0.005), dropped
    torch.manual_seed(3)
    assert torch.equal(dropout(x) != 0, keep)
    assert dropout.eval()(x) is x


def test_adapter_dropout_masks_only_the_adapter_input():
    """With dropout, the base still sees x whole; the adapter's coefficients see x * keep / (1 - p)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    layer = rexft.adapters.adapter_class("lora")(linear, AdapterConfig(type="lora", r=4, dropout=0.5))
    with torch.no_grad():
        layer.rex_B.normal_()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    out = layer.train()(x)
    torch.manual_seed(1)
    dropped = layer.dropout(x)
    assert 0 < (dropped == 0).float().mean() < 1
    torch.testing.assert_close(out, linear(x) + torch.nn.functional.linear(layer.coefficients(dropped), layer.rex_B))
