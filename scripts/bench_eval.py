"""Evaluation throughput: rexft's batched scorer vs. per-example generate() at batch size 1.

    python scripts/bench_eval.py [--model demo|tiny] [--per-task 8] [--batch-size 16] [--new-tokens 1]
    python scripts/bench_eval.py --protocol generate [--model demo-sni] [--tasks 40] [--per-task 4] [--max-new-tokens 32]
        (--max-new-tokens 128: recipes/sni.yaml's setting, Tk-Instruct's; 32: the CPU demo's)
    --engine plain|pool|auto: which eval engine rexft uses (auto: the pool on a CPU, plain elsewhere)
    --malloc kept|system: glibc keeping freed memory, as under the rexft command line (rexft.process; the
        default: the process re-executes itself once), or glibc's defaults

--protocol generate (generative tasks, real SNI validation examples): rexft's generate protocol (prompts
prefilled in batches of --batch-size, each task's shared instruction once per batch, the rest in runs of
similar length; up to --decode-batch-size rows decoding together, finished rows leaving and prefilled ones
joining every few tokens; it also computes every target's NLL) against generate() one example at a time with the
same settings (greedy, the same max_new_tokens and EOS), and against generate() batched in data order
(no length sorting). Prints examples/s, the ratios, and on how many examples each peer produced the
same text as rexft.

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
from rexft.data import PromptFormat, encode_prompt, letter_token_ids
from rexft.inference import make_engine
from rexft.inference import prior_state
from rexft.eval.protocols import Prompts, first_token, generate
from rexft.splits import build_splits
from rexft.modeling import load_model, load_tokenizer, machine_summary
from rexft.process import reexec_with_kept_heap
from rexft.tasks.common import LETTERS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="recipe whose model to use: demo (SmolLM2-135M) or smoke (tiny)")
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1, help="tokens generate() produces per example")
    parser.add_argument("--llm-adapters", action="store_true", help="also time generate() with 4 beams, 32 new tokens")
    parser.add_argument("--data", default=None)
    parser.add_argument("--protocol", default="first_token", choices=["first_token", "generate"])
    parser.add_argument("--max-new-tokens", type=int, default=32, help="--protocol generate: eval.max_new_tokens")
    parser.add_argument("--tasks", type=int, default=None, help="--protocol generate: use the first N tasks (all: default)")
    parser.add_argument("--decode-batch-size", type=int, default=64, help="--protocol generate: eval.decode_batch_size")
    parser.add_argument("--engine", default="auto", choices=["auto", "plain", "pool"], help="eval.engine")
    parser.add_argument("--malloc", choices=("kept", "system"), default="kept")
    args = parser.parse_args()
    if args.malloc == "kept":
        reexec_with_kept_heap()
    print(machine_summary(), flush=True)  # what the figures below depend on
    if args.protocol == "generate":
        return bench_generate(args)
    overrides = [f"recipe={args.model}"] + ([f"data.local_dir={args.data}"] if args.data else [])
    cfg, _ = compose(overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device).to(device).eval()
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    examples = [e for s in build_splits(cfg.data) for e in s.eval[: args.per_task]]

    engine = make_engine(args.engine, model, tokenizer, prior_state(model, None), args.batch_size)
    prompts_of = Prompts(tokenizer, fmt, cfg.data.max_length)
    first_token(engine, prompts_of, examples[:4])  # warm-up
    start = time.perf_counter()
    batched = [vars(r) for r in first_token(engine, prompts_of, examples)]
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
    print(f"model {cfg.model.name_or_path} on {device}, engine {type(engine).__name__}; {n} examples ({args.per_task} per task), protocol first_token")
    print("| method | examples/s | seconds | rexft eval speed-up |")
    print("|---|---|---|---|")
    print(f"| rexft eval (batch {args.batch_size}, one forward per batch) | {n / batched_s:.1f} | {batched_s:.1f} | - |")
    for name, seconds in peers:
        print(f"| {name} | {n / seconds:.2f} | {seconds:.1f} | {seconds / batched_s:.1f}x |")
    print(f"same letter where greedy produced one: {agree}/{compared}")


def bench_generate(args) -> None:
    from rexft.config import EvalConfig
    from rexft.inference.engine import left_pad as left_pad_ids

    recipe = args.model if args.model != "demo" else "demo-sni"
    overrides = [f"recipe={recipe}", f"data.sources.sni.max_tasks={args.tasks or 'null'}", f"data.eval_per_task={args.per_task}"]
    cfg, _ = compose(overrides + ([f"data.local_dir={args.data}"] if args.data else []))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device).to(device).eval()
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    examples = [e for s in build_splits(cfg.data) for e in s.eval[: args.per_task]]
    settings = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, decode_batch_size=args.decode_batch_size)
    engine = make_engine(args.engine, model, tokenizer, prior_state(model, None), args.batch_size)
    prompts_of = Prompts(tokenizer, fmt, cfg.data.max_length)
    generate(engine, prompts_of, examples[:4], settings)  # warm-up
    start = time.perf_counter()
    ours = [row.prediction for row in generate(engine, prompts_of, examples, settings)]
    ours_s = time.perf_counter() - start
    engine.share_prefixes = False  # the pool engine's openings (the plain engine has none)
    start = time.perf_counter()
    unshared = [row.prediction for row in generate(engine, prompts_of, examples, settings)]
    unshared_s = time.perf_counter() - start

    prompts = [encode_prompt(e, tokenizer, fmt, cfg.data.max_length)[0] for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = dict(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=pad, temperature=None, top_p=None, top_k=None)

    def peer(batch_size: int) -> tuple[float, list[str]]:
        """generate() over the examples in data order, ``batch_size`` at a time (left-padded)."""
        texts = []
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(prompts), batch_size):
                batch = {k: v.to(device) for k, v in left_pad_ids(prompts[i:i + batch_size], pad).items()}
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **common)
                texts += [prompts_of.text(row[batch["input_ids"].shape[1]:].tolist(), []) for row in out]
        return time.perf_counter() - start, texts

    single_s, single = peer(1)
    unsorted_s, unsorted = peer(args.batch_size)
    n = len(examples)
    print(f"model {cfg.model.name_or_path} on {device}, engine {type(engine).__name__}; {n} SNI validation examples ({args.per_task} per task, "
          f"{len({e.task for e in examples})} tasks), greedy, max_new_tokens {args.max_new_tokens}")
    print("| method | examples/s | seconds | rexft speed-up | same text as rexft |")
    print("|---|---|---|---|---|")
    print(f"| rexft eval, protocol generate (prefill batch {args.batch_size}, decode batch {args.decode_batch_size}) "
          f"| {n / ours_s:.2f} | {ours_s:.1f} | - | - |")
    for name, seconds, texts in (("rexft, prefixes not shared (eval of a per-row prior adapter)", unshared_s, unshared),
                                 ("generate(), batch 1", single_s, single),
                                 (f"generate(), batch {args.batch_size} in data order", unsorted_s, unsorted)):
        same = sum(a == b for a, b in zip(ours, texts))
        print(f"| {name} | {n / seconds:.2f} | {seconds:.1f} | {seconds / ours_s:.1f}x | {same}/{n} ({same / n:.1%}) |")


if __name__ == "__main__":
    main()
