"""The eval stage, in four parts: ``protocols`` (what is scored, as typed records), ``engine`` (the calls
protocols are written in; the plain engine on transformers' generate()), ``pool`` (the CPU engine: shared
openings, rows joining and leaving a decoding batch, device profiles), ``report`` (summaries, tables,
routing heatmap, ``rexft eval compare``), and ``stage`` (``rexft eval`` itself)."""

from rexft.eval.engine import PlainEngine, RowState
from rexft.eval.pool import PoolEngine, device_profile


def make_engine(kind: str, model, tokenizer, rows: RowState | None, batch_size: int, profile: dict | None = None,
                progress=None):
    """``eval.engine``: plain, pool, or auto (the pool on a CPU, plain elsewhere); ``profile`` overrides
    the device profile's fields (``rexft.eval.pool.DeviceProfile``)."""
    device = next(model.parameters()).device
    if kind == "auto":
        kind = "pool" if device.type == "cpu" else "plain"
    if kind == "plain":
        return PlainEngine(model, tokenizer, rows, batch_size, progress)
    return PoolEngine(model, tokenizer, rows, batch_size, progress, device_profile(device, profile))
