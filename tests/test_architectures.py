"""Every adapter on the decoders users finetune, as tiny random models of today's transformers.

Per architecture and adapter family: a few training steps, eval through rexft's engine (with the per-example
routes a routing plot draws), the per-task static export written as a PEFT adapter that
``PeftModel.from_pretrained`` loads with no key warnings, whose logits equal rexft's static factors, and, with
the routes fixed, the dynamic mixture's (1e-5). Then the failing family of issue 38 (Qwen2-MoE: its sparse-MoE
block flattens the batch before the shared expert's linears) through the real CLI, train -> eval -> merge-export.
README's "Tested architectures" table is this file's matrix.
"""

import copy
import json
import warnings

import pytest
import torch

import rexft
from conftest import ROOT, randomize_adapters, run_cli, vllm_python
from rexft.adapters import adapter_layers, adapter_types, format_targets, set_token_mask
from rexft.config import AdapterConfig, DataConfig, ModelConfig
from rexft.data import PromptFormat
from rexft.errors import RexftError
from rexft.eval.protocols import Prompts, loglik
from rexft.eval.report import RouteRecorder
from rexft.export import (example_routes, mean_routes, set_groups, stack_static_factors, static_factors,
                          write_peft_adapter)
from rexft.inference import make_engine, prior_state
from rexft.modeling import byte_tokenizer

K = 8
VOCAB = 259  # the byte tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
# architecture -> (config class, what differs from COMMON, what its blocks give a linear layer)
ARCHS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}, "q/k/v/o, gate/up/down"),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}, "q/k/v with bias"),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 8}, "sliding-window attention"),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 8}, "pre+post norms, soft-capping"),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2}, "fused qkv_proj, gate_up_proj"),
    "gpt_neox": ("GPTNeoXConfig", {}, "fused query_key_value, parallel residual"),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_key_value_heads": 2, "moe_intermediate_size": 16, "num_experts": 4,
                                     "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32},
                  "sparse MoE: shared expert on (b*s, d)"),
    "mixtral": ("MixtralConfig", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
                "sparse MoE: experts are 3-D parameters"),
    "phimoe": ("PhimoeConfig", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
               "router is an nn.Linear returning a tuple"),
    "falcon": ("FalconConfig", {"multi_query": True, "new_decoder_architecture": False},
               "FalconLinear, fused query_key_value, parallel attention"),
}
IDS = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 12, [0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
TASK_PRIOR = torch.rand(1, K, generator=torch.Generator().manual_seed(1))


def build(arch: str, **shape):
    import transformers

    config_class, extra, _ = ARCHS[arch]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **shape})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def bases():
    """One tiny random model per architecture for the whole module (each test adapts a copy)."""
    return {arch: build(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def examples(data_dir):
    from rexft.splits import build_splits

    splits = build_splits(DataConfig(tasks=["boolq", "copa"], local_dir=str(data_dir), eval_per_task=2, max_length=400))
    return [e for s in splits for e in s.eval]


def config(kind: str) -> AdapterConfig:
    return AdapterConfig(type=kind, prior_dim=K, dropout=0.0, r=4, r1=2, r2=4, num_experts=3)


def train_steps(model, steps: int = 3) -> list[float]:
    """A few AdamW steps on a fixed left-padded batch with a per-example prior (what rexft train sets)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    labels = IDS.masked_fill(MASK == 0, -100)
    losses = []
    for _ in range(steps):
        rexft.set_prior(model, torch.rand(3, K, generator=torch.Generator().manual_seed(2)))
        set_token_mask(model, MASK)
        loss = model(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def peft_load(base, folder):
    """PeftModel.from_pretrained, failing on any warning about missing or unexpected keys."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not keys, keys
    return loaded


@pytest.mark.parametrize("kind", adapter_types())
@pytest.mark.parametrize("arch", list(ARCHS))
def test_trains_evaluates_and_exports_to_peft(bases, examples, arch, kind, tmp_path):
    base = bases[arch]
    with torch.random.fork_rng():  # the adapters' init, whatever tests ran before
        torch.manual_seed(0)
        model = rexft.inject_adapters(copy.deepcopy(base), config(kind))
    layers = adapter_layers(model)
    assert layers and "fused" in format_targets(model) if arch in ("phi3", "gpt_neox", "falcon") else layers
    # train: the loss goes down and every adapter parameter learns
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], losses
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved == set(before) - {n for n in before if "prior_proj" in n and kind != "trex"}
    model.eval()
    # eval: rexft's engine scores the examples; a mixture's routes are one row per example in every layer
    tokenizer = byte_tokenizer()
    priors = torch.rand(len(examples), K, generator=torch.Generator().manual_seed(3)) if kind == "trex" else None
    mixtures = [(n, layer) for n, layer in layers.items() if layer.is_mixture]
    recorder = None
    if mixtures:  # the last mixture layer (Qwen2-MoE: the shared expert's gate, on the flattened batch)
        recorder = RouteRecorder(mixtures[-1][1], prior_state(model, priors))
    engine = make_engine("auto", model, tokenizer, recorder or prior_state(model, priors), 4)
    scored = loglik(engine, Prompts(tokenizer, PromptFormat.for_model(tokenizer, ModelConfig()), 400), examples)
    assert len(scored) == len(examples) and all(len(r.scores) == len(e.options) for r, e in zip(scored, examples))
    if recorder is not None:
        routes, order = recorder.routes()
        assert routes.shape[0] == len(order) and sorted(set(order)) == list(range(len(examples)))
        assert routes.shape[1] == mixtures[-1][1].last_route[0].shape[-1] and routes.isfinite().all()
    # per-task export: each task's mean route -> static factors -> PEFT adapter, loaded with no key warnings
    prompts = [IDS[0, :n].tolist() for n in (12, 7, 5, 9)]
    task_priors = None if kind != "trex" else TASK_PRIOR.expand(len(prompts), K)
    with torch.no_grad():
        per_prompt, tokens = example_routes(model, tokenizer, prompts, task_priors, batch_size=3)
        per_task = [static_factors(model, mean_routes(per_prompt, tokens, index)) for index in ([0, 1], [2, 3])]
        for task, factors in enumerate(per_task):
            write_peft_adapter(tmp_path / f"task{task}", factors, arch, torch.float32)
        loaded = peft_load(base, tmp_path / "task1")
        assert {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in loaded.named_modules()
                if n.endswith(".lora_A")} == set(layers)  # every adapted layer, fused ones included, is in PEFT
        # PEFT's logits == rexft's static factors of that task (GroupedLoRA, rows of both tasks in one batch)
        peft_logits = loaded(input_ids=IDS, attention_mask=MASK).logits
        static_model = copy.deepcopy(model)
        grouped = stack_static_factors(static_model, per_task)
        set_groups(grouped, torch.tensor([1, 0, 1]))
        static_logits = static_model(input_ids=IDS, attention_mask=MASK).logits
        for row in (0, 2):
            torch.testing.assert_close(peft_logits[row][MASK[row] == 1], static_logits[row][MASK[row] == 1], rtol=1e-5, atol=1e-5)
        # routes fixed (routers' weights zeroed: each token's route is the same): the export == the mixture
        for layer in layers.values():
            if getattr(layer, "rex_router", None) is not None:
                layer.rex_router.weight.zero_()
        per_prompt, tokens = example_routes(model, tokenizer, prompts, task_priors, batch_size=3)
        write_peft_adapter(tmp_path / "fixed", static_factors(model, mean_routes(per_prompt, tokens, [0, 1, 2, 3])),
                           arch, torch.float32)
        rexft.set_prior(model, None if task_priors is None else TASK_PRIOR.expand(3, K))
        dynamic = model(input_ids=IDS, attention_mask=MASK).logits
        exported = peft_load(base, tmp_path / "fixed")(input_ids=IDS, attention_mask=MASK).logits
        real = MASK == 1
        # float32 sums in another order (the static factors add the experts up before the matmul): ~2e-5 seen
        torch.testing.assert_close(exported[real], dynamic[real], rtol=1e-4, atol=1e-4)


def test_targets_are_listed_by_name_with_fused_projections_said(bases):
    phi3 = rexft.inject_adapters(copy.deepcopy(bases["phi3"]), config("lora"))
    listing = format_targets(phi3)
    assert "model.layers.*.self_attn.qkv_proj  x2" in listing and "fused: one adapter for q, k and v together" in listing
    assert "fused: one adapter for gate and up together" in listing and "(the output embedding): lm_head" in listing
    phimoe = rexft.inject_adapters(copy.deepcopy(bases["phimoe"]), config("lora"))
    assert "PhimoeTopKRouter: its forward is not a linear map): model.layers.*.mlp.router" in format_targets(phimoe)
    excluded = rexft.inject_adapters(copy.deepcopy(bases["phi3"]), AdapterConfig(type="lora", exclude_modules=["lm_head", "qkv_proj"]))
    assert not any("qkv_proj" in n for n in adapter_layers(excluded))
    assert "not in adapter.target_modules, or in adapter.exclude_modules): model.layers.*.self_attn.qkv_proj" in format_targets(excluded)



def test_a_gpt2_style_model_is_refused_naming_its_conv1d_projections():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB,
                                                                bos_token_id=1, eos_token_id=2))
    with pytest.raises(RexftError, match=r"matched no nn.Linear in GPT2LMHeadModel \(its projections "
                                               r"c_attn, c_fc, c_proj are transformers' GPT-2-style Conv1D"):
        rexft.inject_adapters(gpt2, config("lora"))

@pytest.fixture(scope="module")
def moe_dir(bases, tmp_path_factory):
    """The Qwen2-MoE on disk with the byte tokenizer, as a user's model directory."""
    folder = tmp_path_factory.mktemp("qwen2-moe")
    bases["qwen2_moe"].save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_the_flattening_moe_family_through_the_cli(moe_dir, data_dir, tmp_path):
    """Issue 38's failure as a user met it: trex on Qwen2-MoE died at step 0; now train -> eval -> merge-export
    through the real CLI, and the train log lists the wrapped modules by name."""
    args = ["recipe=smoke", f"run_dir={tmp_path / 'run'}", f"model.name_or_path={moe_dir}", f"data.local_dir={data_dir}",
            "data.tasks=[boolq,copa]", "data.train_per_task=8", "data.eval_per_task=2", "data.max_length=512",
            "trainer.max_steps=3", "trainer.batch_size=4", "export.fidelity_limit=2"]
    trained = run_cli("train", *args)
    assert "model.layers.*.mlp.shared_expert.up_proj" in trained.stdout and "mlp.shared_expert_gate" in trained.stdout
    run_cli("eval", *args)
    run_cli("merge-export", *args)
    run = tmp_path / "run"
    assert (run / "eval" / "routing.png").is_file()
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert set(manifest["per_task"]) == {"boolq", "copa"}
    loaded = peft_load(build("qwen2_moe"), run / "export" / "per_task" / "copa")
    assert loaded(input_ids=IDS).logits.isfinite().all()


# vLLM's CPU attention kernels take 64-wide heads
VLLM_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed here (bash scripts/setup_vllm.sh installs it)")
@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_vllm_loads_a_fused_projection_export_and_gives_peft_greedy_tokens(tmp_path, arch):
    """Phi-3 (qkv_proj, gate_up_proj fused) and GPT-NeoX (query_key_value fused, per head): a MoDE adapter's
    per-task export served by a real vLLM (the CPU build) gives the greedy tokens of transformers + PEFT on the
    same export. (Qwen2-MoE cannot run here: vLLM's MoE LoRA path is Triton-only, and the CPU build has none.)"""
    import subprocess

    shape = dict(VLLM_SHAPE)
    if arch == "gpt_neox":  # it has no grouped-query attention; vLLM would read a stray num_key_value_heads as GQA
        shape.pop("num_key_value_heads")
    base = build(arch, **shape)
    base.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    model = randomize_adapters(rexft.inject_adapters(copy.deepcopy(base), config("mode")), scale=0.3)
    prompts = [IDS[0].tolist(), IDS[1, 5:].tolist()]
    with torch.no_grad():
        per_prompt, tokens = example_routes(model, byte_tokenizer(), prompts, None)
    write_peft_adapter(tmp_path / "export", static_factors(model, mean_routes(per_prompt, tokens, [0, 1])), arch, torch.float32)
    peft = peft_load(base, tmp_path / "export")
    expected, plain = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected.append(peft.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(prompt):].tolist())
            with peft.disable_adapter():
                plain.append(peft.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(prompt):].tolist())
    assert expected != plain  # the adapter changes what is generated: the comparison below means something
    result = subprocess.run([vllm_python(), str(ROOT / "tests" / "vllm_greedy.py"), str(tmp_path / "model"),
                             str(tmp_path / "export"), "6", json.dumps(prompts)], capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("GREEDY ")]
    assert json.loads(line.removeprefix("GREEDY ")) == expected


@pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed here (bash scripts/setup_vllm.sh installs it)")
def test_the_table_of_architectures_vllm_cannot_serve_matches_the_installed_vllm():
    """export.VLLM_WITHOUT_LORA (what merge-export warns about) against vLLM's own registry and supports_lora."""
    import subprocess
    import transformers

    from rexft.export import VLLM_WITHOUT_LORA

    served = [ARCHS[a][0].replace("Config", "ForCausalLM") for a in ("llama", "phi3", "gpt_neox", "qwen2_moe", "mixtral", "gemma2")]
    assert all(hasattr(transformers, name) for name in served)
    names = served + list(VLLM_WITHOUT_LORA)
    script = ("import json, sys\nfrom vllm.model_executor.models import ModelRegistry\n"
              "from vllm.model_executor.models.interfaces import supports_lora\n"
              "out = {}\nfor name in sys.argv[1:]:\n    cls = ModelRegistry._try_load_model_cls(name)\n"
              "    out[name] = bool(cls is not None and supports_lora(cls))\nprint(json.dumps(out))")
    result = subprocess.run([vllm_python(), "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lora = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name for name, ok in lora.items() if not ok} == set(VLLM_WITHOUT_LORA), lora


def test_merge_export_says_which_bases_vllm_cannot_serve(bases):
    from rexft.export import vllm_architecture_note
    from rexft.modeling import model_fingerprint

    assert "no LoRA support" in vllm_architecture_note(model_fingerprint(bases["falcon"])["architecture"])
    assert "PhiMoEForCausalLM" in vllm_architecture_note(model_fingerprint(bases["phimoe"])["architecture"])
    assert vllm_architecture_note(model_fingerprint(bases["phi3"])["architecture"]) is None
