"""Training throughput and memory of rexft adapters against PEFT LoRA and against the limit, in one run.

    python scripts/bench_adapters.py --shape smollm2          # SmolLM2-135M's shape (30 layers, hidden 576)
    python scripts/bench_adapters.py --shape 7b --seq 128     # a 7B-like shape: hidden 4096, 2 layers
    python scripts/bench_adapters.py [--hidden 1024 --layers 4 --seq 256 --batch 4 --steps 6 --rounds 3]

One random LLaMA (built in-process, no download), one batch shape, every method timed for a full
training step (forward, backward, AdamW) in its own subprocess, so peak memory (RSS on CPU, CUDA peak on
GPU) is per method; methods are interleaved over rounds and the median is kept, since absolute times on
shared machines drift. Prints tokens/s, ms/step, peak memory and ratios to the PEFT peer.

The limit (``frozen``): the same model with no adapter at all, forward and backward with every weight
frozen, gradients flowing to every linear layer's output (a zero added to the first block's, so the first
block's input gradient, which no adapter needs, is not computed). That is the cost every adapter method must
pay (the backward through the frozen base for the activations' gradients); each method's tokens/s is also
given as a fraction of it.

Every child runs with glibc keeping freed memory, as the ``rexft`` command line runs (``rexft.process``;
``--malloc system``: glibc's defaults, what a plain ``python`` script gets).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from rexft.modeling import machine_summary
from rexft.process import HEAP, kept_heap_env

METHODS = {
    # name: (adapter config or PEFT rank, peer)
    "frozen": ({"frozen": True}, None),
    "peft-lora-r8": ({"peft_r": 8}, None),
    "rexft-lora-r8": ({"type": "lora", "r": 8, "alpha": 16}, "peft-lora-r8"),
    "peft-lora-r32": ({"peft_r": 32}, None),
    "rexft-lora-r32": ({"type": "lora", "r": 32, "alpha": 64}, "peft-lora-r32"),
    "trex-4x8": ({"type": "trex", "r1": 4, "r2": 8, "prior_dim": 32}, "peft-lora-r32"),
    "trex-8x8": ({"type": "trex", "r1": 8, "r2": 8, "prior_dim": 32}, "peft-lora-r32"),
    "mode-6x4": ({"type": "mode", "r": 4, "num_experts": 6}, "peft-lora-r32"),
    "molora-4x8": ({"type": "molora", "r": 8, "num_experts": 4}, "peft-lora-r32"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # --shape: LLaMA configs (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M, the demo's model
    "7b": (4096, 11008, 2, 32, 32, 32000),    # LLaMA-2-7B's blocks, 2 of its 32
}


def measure(method: str, args) -> dict:
    """Runs inside the child process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import rexft

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, intermediate, layers, heads, kv, vocab = SHAPES[args.shape] if args.shape else (
        args.hidden, args.hidden * 8 // 3, args.layers, args.hidden // 64, args.hidden // 64, args.vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv)
    model = LlamaForCausalLM(config).to(device)
    args.vocab = vocab
    spec, _ = METHODS[method]
    if "frozen" in spec:  # the limit: no adapter, gradients for the activations only
        model.requires_grad_(False)
        # Gradients reach every linear's output, as they reach an adapter's, but not the first block's input
        # (no adapter needs that: requiring it on the embeddings would add the first block's input-gradient
        # GEMMs, a quarter of the backward at 2 layers). A 0-dim zero added to the first block's linear outputs.
        zero = torch.zeros((), device=device, requires_grad=True)
        for module in model.model.layers[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, inputs, out: out + zero)
    elif "peft_r" in spec:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["peft_r"], lora_alpha=2 * spec["peft_r"], lora_dropout=args.dropout,
                                                 target_modules=TARGETS))
    else:
        rexft.inject_adapters(model, {**spec, "dropout": args.dropout})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    prior = torch.rand(args.batch, 32, device=device)
    rexft.set_prior(model, prior)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms_per_step": 1000 * statistics.median(times), "peak_mib": peak,
            "trainable": sum(p.numel() for p in params), "device": device}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None, help="a named model shape (else --hidden, --layers, --vocab)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout, the same for every method")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--malloc", choices=("kept", "system"), default="kept",
                        help="kept: glibc keeps freed memory, as under the rexft command line; system: glibc's defaults")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    print(machine_summary(), flush=True)  # what the figures below depend on
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "seq", "batch", "steps", "dropout")]
    passthrough += [f"--shape={args.shape}"] if args.shape else []
    if args.malloc == "kept":
        env = kept_heap_env() or dict(os.environ)  # None: set already, or not glibc
    else:
        env = {k: v for k, v in os.environ.items() if k not in HEAP}
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for round_index in range(args.rounds):
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, *passthrough, f"--child={method}"], capture_output=True, text=True, check=True,
                                 env=env)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} {method}: {runs[method][-1]['ms_per_step']:.0f} ms/step", file=sys.stderr)
    tokens = args.batch * args.seq
    summary = {}
    for method, results in runs.items():
        ms = statistics.median(r["ms_per_step"] for r in results)
        summary[method] = {"ms": ms, "tok_s": tokens / ms * 1000, "peak": max(r["peak_mib"] for r in results),
                           "trainable": results[0]["trainable"], "device": results[0]["device"]}
    shape = f"shape {args.shape} {SHAPES[args.shape]}" if args.shape else f"LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}"
    print(f"\n{shape}, batch {args.batch} x seq {args.seq}, dropout {args.dropout}, "
          f"median of {args.rounds} rounds x {args.steps} steps, device {summary[args.methods[0]]['device']}, malloc {args.malloc}\n")
    limit = summary.get("frozen")
    print("| method | trainable | ms/step | tokens/s | of the limit | peak MiB | peer | throughput vs peer | memory vs peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        peer = METHODS[method][1]
        if peer in summary:
            p = summary[peer]
            ratios = f"{peer} | {s['tok_s'] / p['tok_s']:.2f}x | {s['peak'] / p['peak']:.2f}x"
        else:
            ratios = "- | - | -"
        fraction = f"{s['tok_s'] / limit['tok_s']:.2f}" if limit else "-"
        print(f"| {method} | {s['trainable']:,} | {s['ms']:.0f} | {s['tok_s']:.0f} | {fraction} | {s['peak']:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
