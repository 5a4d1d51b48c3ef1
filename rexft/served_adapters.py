"""What merge-export's adapters are called and what vLLM loads of them: written by rexft/export.py, read by
rexft/serve/ (the router parses the names, the vLLM backend sizes --max-lora-rank), so both import it from here."""

from __future__ import annotations

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as --max-lora-rank
VLLM_MAX_RANK = VLLM_RANKS[-1]
CLUSTER_PREFIX = "cluster"


def cluster_name(cluster: int) -> str:
    """The per-cluster export's adapter name for prior cluster ``cluster`` (its folder under export/per_cluster)."""
    return f"{CLUSTER_PREFIX}{int(cluster):02d}"


def cluster_of(name: str) -> int:
    """The prior cluster a per-cluster adapter name stands for (``cluster_name``'s inverse)."""
    digits = name.removeprefix(CLUSTER_PREFIX)
    if digits == name or not digits.isdigit():
        raise ValueError(f"'{name}' is not a per-cluster adapter name (cluster<NN>)")
    return int(digits)
