"""cluster-prior performance: embedding throughput vs sentence-transformers, k-means at scale, cache.

    python scripts/bench_prior.py [--texts 2000] [--batch-size 64] [--points 200000]

1. Embeds the same real prompts (the demo mixture's) with rexft's Embedder and with
   sentence-transformers' ``encode()`` on the same model (all-MiniLM-L6-v2), batch size and device,
   alternating twice; prints texts/s and the ratio, and the max difference between the embeddings.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on

    from sentence_transformers import SentenceTransformer

    from rexft.cli import compose
    from rexft.config import PriorConfig
    from rexft.splits import build_splits
    from rexft.prior import Embedder, embed_cached, kmeans, resolve_embedder

    cfg, _ = compose(["recipe=demo", "data.train_per_task=null"] + ([f"data.local_dir={args.data}"] if args.data else []))
    texts = [e.prompt for s in build_splits(cfg.data) for e in s.train][: args.texts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = Embedder("all-MiniLM-L6-v2", max_length=256, device=device)
    peer = SentenceTransformer(resolve_embedder("all-MiniLM-L6-v2"), device=device)
    peer.max_seq_length = 256
    timings = {"rexft": [], "sentence-transformers": []}
    for _ in range(2):
        start = time.perf_counter()
        mine = ours.encode(texts, args.batch_size, progress=False)
        timings["rexft"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = peer.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_tensor=True)
        timings["sentence-transformers"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    print(f"1. embedding {len(texts)} real prompts, all-MiniLM-L6-v2, batch {args.batch_size}, {device} (best of 2)")
    print("| embedder | texts/s |\n|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {len(texts) / seconds:.1f} |")
    print(f"ratio rexft / sentence-transformers: {best['sentence-transformers'] / best['rexft']:.2f}x; "
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
