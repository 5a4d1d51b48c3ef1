"""Evaluation throughput: rexft's batched scorer vs. per-example generate() at batch size 1.

    python scripts/bench_eval.py [--model demo|tiny] [--per-task 8] [--batch-size 16] [--new-tokens 1]

The peer is the reference implementation's way: for each example, ``generate()`` from the prompt with
batch size 1, then read the letter. Both run on the same model, examples and device in one process;
prints examples/s of each and the ratio, and checks both pick the same letters where greedy picks one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rexft.cli import compose
from rexft.data import PromptFormat, build_splits, encode_prompt, letter_token_ids
from rexft.evaluate import Scorer
from rexft.modeling import load_model, load_tokenizer
from rexft.tasks.common import LETTERS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="recipe whose model to use: demo (SmolLM2-135M) or smoke (tiny)")
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1, help="tokens generate() produces per example")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    overrides = [f"recipe={args.model}"] + ([f"data.local_dir={args.data}"] if args.data else [])
    cfg, _ = compose(overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device).to(device).eval()
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    examples = [e for s in build_splits(cfg.data) for e in s.eval[: args.per_task]]

    scorer = Scorer(model, tokenizer, fmt, cfg.data.max_length, args.batch_size, progress=False)
    scorer.first_token(examples[:4])  # warm-up
    start = time.perf_counter()
    batched = scorer.first_token(examples)
    batched_s = time.perf_counter() - start

    prefix, letter_ids = letter_token_ids(tokenizer, fmt, 5)
    prompts = [encode_prompt(e, tokenizer, fmt, cfg.data.max_length, reserve=len(prefix) + 2)[0] + prefix for e in examples]
    agree = compared = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for example, prompt, row in zip(examples, prompts, batched):
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            token = int(out[0, len(prompt)])
            if token in letter_ids[: len(example.options)]:
                compared += 1
                agree += LETTERS[letter_ids.index(token)] == row["predicted"]
    generate_s = time.perf_counter() - start
    n = len(examples)
    print(f"model {cfg.model.name_or_path} on {device}; {n} examples ({args.per_task} per task), protocol first_token")
    print("| method | examples/s | seconds |")
    print("|---|---|---|")
    print(f"| rexft eval (batch {args.batch_size}, one forward per batch) | {n / batched_s:.1f} | {batched_s:.1f} |")
    print(f"| generate(), batch 1, {args.new_tokens} new token(s) | {n / generate_s:.1f} | {generate_s:.1f} |")
    print(f"speed-up: {generate_s / batched_s:.1f}x; same letter where greedy produced one: {agree}/{compared}")


if __name__ == "__main__":
    main()
