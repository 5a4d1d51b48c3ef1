"""The semantic router: which adapter serves a request, from what the request says.

A request is embedded as cluster-prior embedded the training prompts (the run's embedder, mean pooling,
unit length; a chat request's conversation before the reply, as ``rexft.formats.prompt_of_chat`` writes
it). Then:

    per_cluster   the cluster of the largest prior e @ centroids.T among those merge-export wrote (the
                  rule merge-export grouped the training prompts by)
    per_task      the task whose training prompts' mean embedding is nearest
    mixture       no choice to make (the local backend): the request's prior e @ centroids.T goes to every
                  router of the dynamic adapter, as at training

The prior, the nearest cluster and the time spent (embedding + nearest centroid) are recorded with the
route either way, so a deployment's routes can be compared with cluster-prior's assignment later.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rexft.config import PriorConfig, RunConfig
from rexft.errors import RexftError
from rexft.served_adapters import cluster_of
from rexft.serve.protocol import RouteInfo


@dataclass
class Route:
    """What serves one request and why: ``adapter`` the LoRA module it is sent to (the run's name for the
    dynamic mixture), ``how`` "cluster" | "task" | "named" (the request named an adapter) | "mixture"."""

    adapter: str
    how: str
    cluster: int | None = None  # the nearest prior centroid
    similarity: float | None = None  # the request's embedding . the destination's vector (centroid or task mean)
    router_ms: float = 0.0  # embedding + nearest centroid

    def info(self) -> RouteInfo:
        """The route as responses carry it (``rexft_route``) and routes.jsonl records it."""
        return RouteInfo(adapter=self.adapter, how=self.how, cluster=self.cluster,
                         similarity=None if self.similarity is None else round(self.similarity, 4),
                         router_ms=round(self.router_ms, 3))


class Router:
    """Embeds a request and picks its destination; thread-safe (one embedding at a time)."""

    def __init__(self, embedder, centroids: torch.Tensor | None, destinations: dict[str, torch.Tensor], how: str,
                 default: str):
        self.embedder, self.centroids = embedder, centroids  # centroids (k, d), or None (no prior)
        self.names = list(destinations)
        self.matrix = torch.stack(list(destinations.values())) if destinations else None  # (G, d)
        self.how, self.default = how, default
        self.lock = threading.Lock()

    def embed(self, text: str) -> torch.Tensor:
        with self.lock:
            return self.embedder.encode([text], batch_size=1, progress=False)[0]

    def route(self, text: str) -> tuple[Route, torch.Tensor | None]:
        """(the route, the request's prior (k,) or None when the run has no prior)."""
        if self.embedder is None:  # nothing to route by: a prior-free adapter served as is
            return Route(self.default, self.how), None
        clock = time.perf_counter()
        embedding = self.embed(text)
        prior = None if self.centroids is None else embedding @ self.centroids.T
        cluster = None if prior is None else int(prior.argmax())
        adapter, similarity = self.default, None if prior is None else float(prior[cluster])
        if self.matrix is not None:
            scores = self.matrix @ embedding
            best = int(scores.argmax())
            adapter, similarity = self.names[best], float(scores[best])
        ms = (time.perf_counter() - clock) * 1000
        return Route(adapter, self.how, cluster, similarity, ms), prior


# ------------------------------------------------------------------------------------------- building
def prior_of_run(cfg: RunConfig) -> tuple[torch.Tensor, dict] | None:
    """(centroids (k, d), meta) that the run's adapter takes its prior from, else the run's prior/ (what
    merge-export's per-cluster grouping used), else None."""
    from rexft.adapters import ADAPTER_CONFIG, read_adapter_config
    from rexft.prior import adapter_prior, load_prior

    adapter_dir = cfg.path / "adapter"
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        prior = adapter_prior(adapter_dir, read_adapter_config(adapter_dir))
        if prior is not None:
            return prior
    return load_prior(cfg.path) if (cfg.path / "prior" / "meta.json").is_file() else None


def task_signatures(cfg: RunConfig, tasks: list[str], meta: dict) -> dict[str, torch.Tensor]:
    """Each task's mean training-prompt embedding, unit length (the embeddings cluster-prior cached)."""
    from rexft.prior import embed_cached
    from rexft.splits import frozen_splits

    by_task = {s.task: [e.prompt for e in (s.train or s.eval)] for s in frozen_splits(cfg)}
    missing = [t for t in tasks if not by_task.get(t)]
    if missing:
        raise RexftError(f"per-task routing: no training prompts recorded for {missing} in {cfg.path / 'data'}")
    embedder_cfg = PriorConfig(**{**cfg.prior.__dict__, "embedder": meta["embedder"], "max_length": meta["max_length"]})
    texts = [text for t in tasks for text in by_task[t]]
    embeddings = embed_cached(texts, embedder_cfg)
    out, start = {}, 0
    for t in tasks:
        n = len(by_task[t])
        out[t] = torch.nn.functional.normalize(embeddings[start:start + n].mean(0), dim=0)
        start += n
    return out


def build_router(cfg: RunConfig, exports: dict[str, Path] | None, mode: str | None) -> Router:
    """The router for the local backend (``exports`` None: the dynamic mixture, named by the run) or for
    exports written by merge-export in ``mode`` (per_cluster / per_task)."""
    from rexft.prior import Embedder

    found = prior_of_run(cfg)
    if found is None and exports is None:
        return Router(None, None, {}, "mixture", cfg.name)
    if found is None:
        raise RexftError(f"routing needs the run's prior: no {cfg.path / 'prior'} and no centroids with the adapter; "
                         "run `rexft cluster-prior` with this recipe")
    centroids, meta = found
    embedder = Embedder(meta["embedder"], meta["max_length"])
    if exports is None:
        return Router(embedder, centroids, {}, "mixture", cfg.name)
    if mode == "per_cluster":
        destinations = {name: centroids[cluster_of(name)] for name in exports}
        return Router(embedder, centroids, destinations, "cluster", cfg.name)
    return Router(embedder, centroids, task_signatures(cfg, list(exports), meta), "task", cfg.name)
