"""merge-export's route pass (``export.example_routes``) in the dtype ``export.route_dtype`` picks, against
float32 and bfloat16 forced: SmolLM2-135M with an untrained trex adapter (the pass's cost does not depend on
the weights), the demo's training prompts (``--per-task`` of each of its 14 tasks).

    python scripts/bench_routes.py [--per-task 8]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_routes.py   (an AVX2-only CPU's kernels)
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import rexft
from rexft.cli import compose
from rexft.data import PromptFormat, build_splits, encode_prompt
from rexft.export import example_routes
from rexft.modeling import compute_dtype, load_model, load_tokenizer, machine_summary, native_bf16


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=8, help="training prompts per task (the demo's export.route_examples)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--dtypes", default="auto,float32,bfloat16", help="which to time, comma-separated")
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on
    cfg, _ = compose(["recipe=demo"] + ([f"data.local_dir={args.data}"] if args.data else []))
    tokenizer = load_tokenizer(cfg.model)
    model = rexft.inject_adapters(load_model(cfg.model, len(tokenizer)), cfg.adapter).eval()
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    train = [e for s in build_splits(cfg.data) for e in s.train[: args.per_task]]
    prompts = [p for p in (encode_prompt(e, tokenizer, fmt, cfg.data.max_length)[0] for e in train) if p is not None]
    priors = torch.rand(len(prompts), cfg.adapter.prior_dim) if cfg.adapter.use_prior else None
    auto = compute_dtype("auto", model)
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}: native bf16 {native_bf16('cpu')}; route_dtype auto -> "
          f"{'float32 (the model)' if auto is None else auto}; {len(prompts)} prompts")
    example_routes(model, tokenizer, prompts[:2], None if priors is None else priors[:2])  # warm-up
    print("| route_dtype | seconds |\n|---|---|")
    chosen = {"auto": auto, "float32": None, "bfloat16": torch.bfloat16}
    for name, dtype in ((n, chosen[n]) for n in args.dtypes.split(",")):
        start = time.perf_counter()
        example_routes(model, tokenizer, prompts, priors, cfg.eval.batch_size, dtype=dtype)
        print(f"| {name} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
