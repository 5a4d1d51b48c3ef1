"""Evaluation throughput: rexft's batched scorer vs. per-example generate() at batch size 1.

    python scripts/bench_eval.py [--model demo|tiny] [--per-task 8] [--batch-size 16] [--new-tokens 1]

The peer is the reference implementation's way: for each example, ``generate()`` from the prompt with
batch size 1, then read the letter. Two peers are timed: greedy with ``--new-tokens`` (default 1, the
cheapest generate() can be: one forward over the prompt), and, with ``--llm-adapters``, the settings of
LLM-Adapters' commonsense_evaluate.py that this literature's generation-style evaluations use (4 beams,
32 new tokens). All run on the same model, examples and device in one process; prints examples/s of
each and the ratios, and checks the greedy peer picks the same letters where it picks one.
"""

from __future__ import annotations

import argparse
import time

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
    parser.add_argument("--llm-adapters", action="store_true", help="also time generate() with 4 beams, 32 new tokens")
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

    def per_example_generate(**settings) -> tuple[float, list[int]]:
        """Seconds for all examples, and each one's first generated token."""
        first_tokens = []
        start = time.perf_counter()
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt], device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, **settings)
                first_tokens.append(int(out[0, len(prompt)]))
        return time.perf_counter() - start, first_tokens

    greedy_s, greedy_tokens = per_example_generate(max_new_tokens=args.new_tokens)
    peers = [(f"generate(), batch 1, greedy, {args.new_tokens} new token(s)", greedy_s)]
    if args.llm_adapters:
        peers.append(("generate(), batch 1, 4 beams, up to 32 new tokens (LLM-Adapters' settings)",
                      per_example_generate(max_new_tokens=32, num_beams=4)[0]))
    letters = [(LETTERS[letter_ids.index(t)], row["predicted"]) for e, t, row in zip(examples, greedy_tokens, batched)
               if t in letter_ids[: len(e.options)]]
    agree, compared = sum(a == b for a, b in letters), len(letters)
    n = len(examples)
    print(f"model {cfg.model.name_or_path} on {device}; {n} examples ({args.per_task} per task), protocol first_token")
    print("| method | examples/s | seconds | rexft eval speed-up |")
    print("|---|---|---|---|")
    print(f"| rexft eval (batch {args.batch_size}, one forward per batch) | {n / batched_s:.1f} | {batched_s:.1f} | - |")
    for name, seconds in peers:
        print(f"| {name} | {n / seconds:.2f} | {seconds:.1f} | {seconds / batched_s:.1f}x |")
    print(f"same letter where greedy produced one: {agree}/{compared}")


if __name__ == "__main__":
    main()
