"""Export: merged == adapter, PEFT reload, static per-task export reproduces constant routing exactly."""

import torch
from peft import PeftModel

import rexft
from conftest import randomize_adapters, tiny_model
from rexft.adapters import adapter_layers
from rexft.config import AdapterConfig
from rexft.export import example_routes, mean_routes, merge_into_base, static_factors, write_peft_adapter
from rexft.modeling import byte_tokenizer
from transformers import AutoModelForCausalLM

IDS = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))


def randomized(kind, **kw):
    return randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type=kind, prior_dim=8, dropout=0, **kw)), seed=2)


@torch.no_grad()
def test_merged_model_equals_adapter_model_and_reloads_without_rexft(tmp_path):
    model = randomized("lora", r=4, alpha=8)
    expected = model(input_ids=IDS).logits
    merged = merge_into_base(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_peft_format_export_loads_with_peft_and_gives_the_same_logits(tmp_path):
    model = randomized("lora", r=4, alpha=8)
    expected = model(input_ids=IDS).logits
    write_peft_adapter(tmp_path / "peft", static_factors(model, {}), "tiny-random-llama", torch.float32)
    peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "peft"))
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_export_of_constant_routing_reproduces_dynamic_logits(tmp_path):
    """Prior-only trex routing is constant per example: its per-task static LoRA must be exact."""
    for kind, kw in [("trex", {"use_router": False}), ("molora", {}), ("hydralora", {}), ("mode", {})]:
        model = randomized(kind, **kw)
        for layer in adapter_layers(model).values():  # zero router weights: routing independent of tokens
            if getattr(layer, "rex_router", None) is not None:
                layer.rex_router.weight.zero_()
        prior = torch.rand(1, 8).expand(2, 8)
        rexft.set_prior(model, prior)
        expected = model(input_ids=IDS).logits
        per_prompt, tokens = example_routes(model, byte_tokenizer(), IDS.tolist(), prior)
        routes = mean_routes(per_prompt, tokens, list(range(len(IDS))))
        write_peft_adapter(tmp_path / kind, static_factors(model, routes), "tiny-random-llama", torch.float32)
        static = PeftModel.from_pretrained(tiny_model(), str(tmp_path / kind))
        torch.testing.assert_close(static(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5, msg=kind)


@torch.no_grad()
def test_grouped_lora_scores_each_row_with_its_own_export(tmp_path):
    """A batch mixing groups through GroupedLoRA == PEFT loading each group's exported adapter alone."""
    from rexft.export import set_groups, stack_static_factors

    model = randomized("mode")
    routes = []
    for seed in (1, 2):  # two different constant routes: two static exports
        per_prompt, tokens = example_routes(model, byte_tokenizer(), IDS[seed - 1:seed].tolist(), None)
        routes.append(mean_routes(per_prompt, tokens, [0]))
    per_group = [static_factors(model, r) for r in routes]
    for g, factors in enumerate(per_group):
        write_peft_adapter(tmp_path / f"g{g}", factors, "tiny-random-llama", torch.float32)
    layers = stack_static_factors(model, per_group)
    for groups in ([1, 0], [0, 0], [1, 1]):  # mixed (row 0 uses export 1, row 1 export 0), then one group
        set_groups(layers, torch.tensor(groups))
        mixed = model(input_ids=IDS).logits
        for row, group in enumerate(groups):
            alone = PeftModel.from_pretrained(tiny_model(), str(tmp_path / f"g{group}"))(input_ids=IDS[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
        # PEFT's own mixed-adapter batch (both exports in one PeftModel, ``adapter_names`` per row): the same
        peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "g0"), adapter_name="g0")
        peft_model.load_adapter(str(tmp_path / "g1"), adapter_name="g1")
        peft_mixed = peft_model(input_ids=IDS, adapter_names=[f"g{g}" for g in groups]).logits
        torch.testing.assert_close(mixed, peft_mixed, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_routes_with_a_tasks_opening_run_once_equal_routes_of_whole_prompts():
    """example_routes with groups: the prompts of a task share their opening tokens' forward; each prompt's
    mean route over its tokens is unchanged."""
    model = randomized("mode")
    opening = torch.randint(3, 259, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [opening + row[:n] for row, n in zip(IDS.tolist() * 2, (5, 9, 3, 16))] + [IDS[0, :7].tolist()]
    groups = ["task"] * 4 + ["alone"]
    whole, tokens = example_routes(model, byte_tokenizer(), prompts, None, batch_size=3)
    shared, shared_tokens = example_routes(model, byte_tokenizer(), prompts, None, batch_size=3, groups=groups)
    assert torch.equal(tokens, shared_tokens)
    for name in whole:
        torch.testing.assert_close(shared[name], whole[name], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_routes_of_a_batch_equal_routes_of_each_prompt_alone():
    """example_routes with per-prompt priors on prompts of very different lengths (a batch runs in several
    runs of similar length): each prompt's mean route is what it gives alone."""
    model = randomized("trex")
    lengths = (40, 3, 31, 9, 16, 2, 25, 12)
    prompts = [torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    priors = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(4))
    batched, tokens = example_routes(model, byte_tokenizer(), prompts, priors, batch_size=8)
    assert tokens.tolist() == list(lengths)
    for i, prompt in enumerate(prompts):
        alone, _ = example_routes(model, byte_tokenizer(), [prompt], priors[i:i + 1])
        for name in batched:
            torch.testing.assert_close(batched[name][i], alone[name][0], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_routes_computed_in_bfloat16_are_close_to_float32_routes():
    """export.route_dtype=bfloat16 on a float32 model: the routes' pass runs its matmuls in bf16 (autocast)
    and each prompt's mean route stays within bf16's rounding of the float32 one."""
    model = randomized("trex")
    prompts = [torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 3, 17)]
    priors = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(4))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    exact, _ = example_routes(model, byte_tokenizer(), prompts, priors)
    rounded, _ = example_routes(model, byte_tokenizer(), prompts, priors, dtype=torch.bfloat16)
    hook.remove()
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    for name in exact:
        assert not torch.equal(rounded[name], exact[name])
        torch.testing.assert_close(rounded[name], exact[name], rtol=0, atol=2e-2)


@torch.no_grad()
def test_reload_check_loads_both_exports_into_one_peft_model_and_catches_a_wrong_file(tmp_path, monkeypatch):
    """check_written: the first and last export, two adapters of one PeftModel, must each give
    GroupedLoRA's logits; an export whose file is not its factors fails, naming the folder."""
    import pytest
    from safetensors.torch import load_file, save_file

    import rexft.export as export
    from rexft.errors import RexftError

    model = randomized("mode")
    per_group = []
    for seed in (1, 2):
        per_prompt, tokens = example_routes(model, byte_tokenizer(), IDS[seed - 1:seed].tolist(), None)
        per_group.append(static_factors(model, mean_routes(per_prompt, tokens, [0])))
    for g, factors in enumerate(per_group):
        write_peft_adapter(tmp_path / f"g{g}", factors, "tiny-random-llama", torch.float32)
    layers = export.stack_static_factors(model, per_group)
    monkeypatch.setattr(export, "base_model_for_export", lambda cfg, tokenizer: tiny_model())
    monkeypatch.setattr(export, "probe_ids", lambda tokenizer, cfg: IDS[:1])
    export.check_written(None, None, tmp_path, ["g0", "g1"], layers, model, torch.float32)  # the files are the factors
    weights = load_file(tmp_path / "g1" / "adapter_model.safetensors")
    save_file({k: v * 3 if "lora_B" in k else v for k, v in weights.items()}, tmp_path / "g1" / "adapter_model.safetensors")
    with pytest.raises(RexftError, match="g1 differs from its factors"):
        export.check_written(None, None, tmp_path, ["g0", "g1"], layers, model, torch.float32)
