"""Shared fixtures: tiny random models built in-process, the real data in ../shared/data, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("REXFT_DATA", ROOT.parent / "shared" / "data")).resolve()


def pytest_configure(config):
    # One embedding / tokenization cache for the whole session, outside the user's home.
    os.environ.setdefault("REXFT_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "rexft"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def validation_examples(task: str, local_dir, prompt_style: str = "chat") -> list:
    """A built-in task's validation examples, read as `rexft data` reads them (local_dir None: the hub)."""
    from rexft.config import DataConfig
    from rexft.splits import load_builtin

    data = DataConfig(tasks=[task], local_dir=None if local_dir is None else str(local_dir), prompt_style=prompt_style)
    return load_builtin(task, data).eval


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or REXFT_DATA). Missing: the test is skipped here, and fails in CI (CI set), where a
    missing checkout of the data would otherwise pass a third of the suite as skips."""
    if not (DATA / "MANIFEST.md").is_file():
        message = f"real data not found at {DATA} (set REXFT_DATA, or check out the data beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return DATA


def tiny_model(seed: int = 0, layers: int = 2, vocab: int = 259):
    from rexft.config import ModelConfig, TinyModelConfig
    from rexft.modeling import tiny_llama

    return tiny_llama(ModelConfig(tiny=TinyModelConfig(num_hidden_layers=layers, seed=seed)), vocab).eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.1):
    """Give every adapter parameter non-trivial values (B is zero at init, so adapters start as identity)."""
    from rexft.adapters import is_adapter_param

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def assert_packed_equals_alone(model, rows: list[dict], pad_id: int) -> None:
    """Pack ``rows`` (each with its own prior) into one row: every example's logits and labels there equal
    the example run alone (pack_rows places the longest first)."""
    import rexft
    from rexft.data import collate_packed, pack_rows

    (packed,) = pack_rows(rows, 1024)
    batch = collate_packed([packed], pad_id)
    rexft.set_prior(model, batch["prior"])
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
            n = len(row["input_ids"])
            assert batch["labels"][0, start:start + n].tolist() == row["labels"]
            rexft.set_prior(model, row["prior"][None])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(together[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


class HashEmbedder:
    """A stand-in for the prior's embedder: a unit vector drawn from a seed that the text's bytes give."""

    def __init__(self, dim: int = 16):
        self.dim = dim

    def encode(self, texts: list[str], batch_size: int = 1, progress: bool = False) -> torch.Tensor:
        import zlib

        seeds = [zlib.crc32(text.encode()) for text in texts]
        vectors = torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return torch.nn.functional.normalize(vectors, dim=-1)


def tiny_serving_app(max_tokens: int = 8, context: int = 96, max_batch: int = 4, api_key: str | None = None):
    """``rexft serve``'s app over the local backend, in-process: a tiny random LLaMA with a trex adapter that
    takes a prior per request (randomized, so rows' priors change their tokens), the byte tokenizer, and a
    router over ``HashEmbedder`` and 4 random centroids. The model is named "tiny"."""
    from rexft.config import AdapterConfig
    from rexft.data import PromptFormat
    from rexft.modeling import byte_tokenizer
    from rexft.serve.app import Service, create_app
    from rexft.serve.local import LocalBackend
    from rexft.serve.router import Router

    centroids = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    model = tiny_model()
    import rexft

    rexft.inject_adapters(model, AdapterConfig(type="trex", r1=2, r2=4, prior_dim=4))
    randomize_adapters(model.eval())
    tokenizer = byte_tokenizer()
    router = Router(HashEmbedder(), centroids, {}, "mixture", "tiny")
    backend = LocalBackend(model, tokenizer, max_batch, max_tokens)
    service = Service("tiny", router, tokenizer, backend, [], PromptFormat(chat=False, plain_template="{prompt}\nAnswer:"),
                      max_tokens=max_tokens, context=context, uses_prior=True, api_key=api_key)
    return create_app(service)


def vllm_python() -> str | None:
    """REXFT_VLLM_PYTHON, or .venv-vllm once scripts/setup_vllm.sh completed it."""
    if os.environ.get("REXFT_VLLM_PYTHON"):
        return os.environ["REXFT_VLLM_PYTHON"]
    ready = ROOT / ".venv-vllm" / "rexft-ready"
    return str(ROOT / ".venv-vllm" / "bin" / "python") if ready.is_file() else None


def run_cli(*args: str, cwd: Path = ROOT, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m rexft ARGS`` as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "rexft", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"rexft {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
