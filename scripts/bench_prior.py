"""cluster-prior performance: embedding throughput (sentence-transformers vs hand-written pooling), k-means at scale, cache.

    python scripts/bench_prior.py [--texts 2000] [--batch-size 64] [--points 200000]

1. Embeds the same real prompts (the demo mixture's) with rexft's Embedder (sentence-transformers'
   ``encode(normalize_embeddings=True)``) and with the hand-written path it replaced (transformers' AutoModel,
   mean pooling over real tokens, L2 normalisation: ``PooledEncoder`` below) on the same model
   (all-MiniLM-L6-v2), batch size and device, alternating twice; prints texts/s, the ratio and the max
   difference between the embeddings.
2. Spherical k-means (k-means++ init, torch backend) on ``--points`` x 384 random unit vectors, k=32.
3. ``embed_cached`` twice on the same texts: the second call is a cache hit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from rexft.modeling import machine_summary


class PooledEncoder:
    """The hand-written embedder rexft used before sentence-transformers: AutoModel, mean pooling, L2 norm."""

    def __init__(self, source: str, max_length: int, device: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.max_length, self.device = max_length, device

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(texts), batch_size):
            index = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[index] = torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float(), dim=-1).cpu()
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on

    from rexft.cli import compose
    from rexft.config import PriorConfig
    from rexft.splits import build_splits
    from rexft.prior import Embedder, embed_cached, kmeans, resolve_embedder

    cfg, _ = compose(["recipe=demo", "data.train_per_task=null"] + ([f"data.local_dir={args.data}"] if args.data else []))
    texts = [e.prompt for s in build_splits(cfg.data) for e in s.train][: args.texts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = Embedder("all-MiniLM-L6-v2", max_length=256, device=device)
    peer = PooledEncoder(resolve_embedder("all-MiniLM-L6-v2"), 256, device)
    timings = {"rexft (sentence-transformers)": [], "hand-written pooling": []}
    for _ in range(2):
        start = time.perf_counter()
        mine = ours.encode(texts, args.batch_size, progress=False)
        timings["rexft (sentence-transformers)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = peer.encode(texts, args.batch_size)
        timings["hand-written pooling"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    print(f"1. embedding {len(texts)} real prompts, all-MiniLM-L6-v2, batch {args.batch_size}, {device} (best of 2)")
    print("| embedder | texts/s |\n|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {len(texts) / seconds:.1f} |")
    print(f"ratio sentence-transformers / hand-written: {best['hand-written pooling'] / best['rexft (sentence-transformers)']:.2f}x; "
          f"max |difference| of embeddings: {(mine - theirs.cpu()).abs().max():.2e}")

    points = torch.nn.functional.normalize(torch.randn(args.points, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    start = time.perf_counter()
    kmeans(points, 32, iters=100, restarts=1, backend="torch")
    print(f"\n2. k-means (torch, k-means++ init, 1 restart, <=100 iterations) on {args.points} x 384, k=32: "
          f"{time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as cache:
        os.environ["REXFT_CACHE"] = cache
        start = time.perf_counter()
        embed_cached(texts, PriorConfig(), ours)
        first = time.perf_counter() - start
        start = time.perf_counter()
        embed_cached(texts, PriorConfig())
        second = time.perf_counter() - start
    print(f"\n3. embed_cached on {len(texts)} texts: first run {first:.1f} s, second run (cache hit) {second:.2f} s")


if __name__ == "__main__":
    main()
