"""Adapters whatever shape a block gives its linear layers: (b, s, d), flattened (b*s, d), packed rows.

A tiny LLaMA whose MLPs flatten the batch before their linears (as Qwen2-MoE's shared expert does) must give
the plain LLaMA's logits, gradients, per-example routes and exports exactly; tokens that cannot be mapped back
to their examples are one error naming the module.
"""

import copy

import pytest
import torch

import rexft
from conftest import assert_packed_equals_alone, randomize_adapters, tiny_model
from rexft.adapters import adapter_layers, adapter_types, routing_stats, set_token_mask
from rexft.config import AdapterConfig
from rexft.errors import RexftError
from rexft.export import example_routes, mean_routes, set_groups, stack_static_factors, static_factors
from rexft.modeling import byte_tokenizer

K = 8
IDS = torch.randint(3, 259, (3, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 10, [0] * 4 + [1] * 6, [0] * 7 + [1] * 3])  # left padding: the mask matters
PRIOR = torch.rand(3, K, generator=torch.Generator().manual_seed(1))


class FlatMLP(torch.nn.Module):
    """LLaMA's MLP with the same linears, run on (b*s, d) as blocks that flatten the batch do."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # (b*s, d)
        return self.down_proj(self.act_fn(self.gate_proj(flat)) * self.up_proj(flat)).view_as(x)


class SomeTokensMLP(FlatMLP):
    """A linear that sees a subset of the batch's tokens (as a mixture-of-experts' expert does)."""

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        out[::2] = self.down_proj(self.act_fn(self.gate_proj(flat[::2])) * self.up_proj(flat[::2]))
        return out.view_as(x)


def flattening(model, block=FlatMLP):
    for layer in model.model.layers:
        layer.mlp = block(layer.mlp)
    return model


def pair(kind, **kw):
    """The same adapted model twice: plain, and with every MLP flattening the batch."""
    plain = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type=kind, prior_dim=K, dropout=0, **kw)))
    flat = flattening(tiny_model())
    rexft.inject_adapters(flat, AdapterConfig(type=kind, prior_dim=K, dropout=0, **kw))
    flat.load_state_dict(plain.state_dict())
    return plain, flat


def forward(model, ids=IDS, mask=MASK, prior=PRIOR):
    rexft.set_prior(model, prior)
    set_token_mask(model, mask)
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", adapter_types())
def test_a_block_that_flattens_the_batch_equals_one_that_does_not(kind):
    """Outputs, gradients, per-example routes and routing statistics: the same in both layouts."""
    plain, flat = pair(kind)
    routed = [n for n, layer in adapter_layers(plain).items() if layer.is_mixture and "mlp" in n]
    for model in (plain, flat):
        for name in routed:
            adapter_layers(model)[name].route_log = []
        model.train()
        forward(model).pow(2).mean().backward()
    torch.testing.assert_close(forward(flat), forward(plain), rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, param in flat.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in routed:
        expected, got = adapter_layers(plain)[name].route_log[0], adapter_layers(flat)[name].route_log[0]
        assert got.shape == (3, expected.shape[1])  # (examples, E), not a mean over the wrong axis
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert routing_stats(flat) == routing_stats(plain)


@pytest.mark.parametrize("kind", ["trex", "mode", "hydralora"])
def test_export_routes_and_grouped_exports_in_a_flattening_block(kind):
    """example_routes (the per-task export's routes) and GroupedLoRA (every export at once, rows of different
    groups in one batch) give the plain model's numbers when the block flattens the batch."""
    plain, flat = pair(kind)
    prompts = [IDS[0, :n].tolist() for n in (10, 4, 7)]
    priors = PRIOR if kind == "trex" else None
    with torch.no_grad():
        routes = [example_routes(model, byte_tokenizer(), prompts, priors, batch_size=3) for model in (plain, flat)]
        for name in routes[0][0]:
            torch.testing.assert_close(routes[1][0][name], routes[0][0][name], rtol=1e-6, atol=1e-7)
        per_group = [static_factors(plain, mean_routes(*routes[0], [i])) for i in range(2)]
        logits = []
        for model in (plain, flat):
            layers = stack_static_factors(model, per_group)
            set_groups(layers, torch.tensor([1, 0, 1]))
            logits.append(model(input_ids=IDS).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-6, atol=1e-6)


def test_generate_with_beams_through_a_flattening_block():
    """Decoding steps (one new token a row, beams repeating rows) reach the flattened linears as (b*s, d)."""
    plain, flat = pair("trex")
    outs = []
    for model in (plain, flat):
        rexft.set_prior(model, PRIOR[:2])
        outs.append(model.generate(IDS[:2], max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kind", ["trex", "mode", "molora", "hydralora"])
def test_tokens_that_cannot_be_mapped_to_their_examples_are_one_error_naming_the_module(kind):
    model = flattening(tiny_model(), SomeTokensMLP)
    rexft.inject_adapters(model, AdapterConfig(type=kind, prior_dim=K, dropout=0))
    with pytest.raises(RexftError, match=r"model\.layers\.0\.mlp\.gate_proj: its input has shape \(15, 64\) but the "
                                         r"batch holds 3 x 10 tokens.*exclude_modules"):
        forward(model)
    # excluded by name, the rest trains; LoRA (no per-example state) takes any layout
    rexft.inject_adapters(excluded := flattening(tiny_model(), SomeTokensMLP),
                          AdapterConfig(type=kind, prior_dim=K, dropout=0, exclude_modules=["lm_head", "mlp"]))
    assert forward(excluded).isfinite().all()
    lora = rexft.inject_adapters(flattening(tiny_model(), SomeTokensMLP), AdapterConfig(type="lora", dropout=0))
    assert forward(lora).isfinite().all()


def test_a_permuted_token_grid_is_an_error_not_a_broadcast():
    model = rexft.inject_adapters(tiny_model(), AdapterConfig(type="mode", dropout=0))
    layer = adapter_layers(model)["model.layers.0.mlp.up_proj"]
    forward(model)  # records the (3, 10) grid
    with pytest.raises(RexftError, match=r"mlp\.up_proj: its input has shape \(10, 3, 64\)"):
        layer(torch.randn(10, 3, 64))
    with pytest.raises(RexftError, match="a prior for 2 examples does not fit a batch of 3 rows"):
        forward(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=K)), prior=PRIOR[:2])


@pytest.mark.parametrize("block", [None, FlatMLP])
def test_packed_rows_give_each_example_its_own_route(block):
    """Packed rows (several examples a row, per-token priors): logits as each example alone, and the
    per-example routes are those of each example alone, not of each row."""
    from rexft.data import collate_packed, pack_rows

    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=K, dropout=0)))
    if block is not None:
        model = copy.deepcopy(model)
        for layer in model.model.layers:
            layer.mlp = block(layer.mlp)
    lengths = (9, 4, 6, 3, 5)
    rows = [{"input_ids": IDS.flatten()[:n].tolist(), "labels": [-100] * n, "prior": PRIOR[i % 3]} for i, n in enumerate(lengths)]
    assert_packed_equals_alone(model, rows, 0)
    name = "model.layers.1.mlp.down_proj"
    layer = adapter_layers(model)[name]
    batch = collate_packed(pack_rows(rows, 16), 0)
    assert batch["input_ids"].shape[0] == 2 and int(batch["example_ids"].max()) == len(rows) - 1
    rexft.set_prior(model, batch["prior"])
    set_token_mask(model, batch["token_mask"], batch["example_ids"])
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    packed = layer.per_example_route()  # (examples, E), in the batch's example order
    firsts = [(batch["example_ids"] == e).nonzero()[0] for e in range(len(rows))]
    for e, (r, c) in enumerate(firsts):
        n = int((batch["example_ids"] == e).sum())
        ids = batch["input_ids"][r, c:c + n]
        rexft.set_prior(model, batch["prior"][r, c][None])
        set_token_mask(model, None)
        with torch.no_grad():
            model(input_ids=ids[None])
        torch.testing.assert_close(packed[e], layer.per_example_route()[0], rtol=1e-4, atol=1e-5)
