"""Inference, below every stage that runs the trained model (eval, merge-export, serve, the lm-eval harness).

    loading   the run's model (base + adapter, or a merged export) and its priors
    engine    the ``Engine`` interface (``Row``, ``Sampling``, the per-row state hook ``RowState``) and the
              plain engine on transformers' generate() and cache
    pool      the pooled engine (the CPU default): shared openings, rows joining and leaving one decoding batch
    prefix    shared openings run once; ``prefix_passes``, the walk merge-export's routes take
    stops     where generated text ends: EOS, stop strings, incrementally while decoding
    profile   what the pooled engine trades off per device type
"""

from rexft.inference.engine import Engine, Feed, Generated, PlainEngine, Row, RowState, Sampling, prior_state
from rexft.inference.loading import LoadedModel, adapter_priors, load_model_for_inference
from rexft.inference.pool import PoolEngine
from rexft.inference.prefix import PrefixPass, prefix_passes
from rexft.inference.profile import DeviceProfile, device_profile
from rexft.inference.stops import TextStream, cut_at_stops, new_text

__all__ = ["DeviceProfile", "Engine", "Feed", "Generated", "LoadedModel", "PlainEngine", "PoolEngine", "PrefixPass", "Row",
           "RowState", "Sampling", "TextStream", "adapter_priors", "cut_at_stops", "device_profile",
           "load_model_for_inference", "make_engine", "new_text", "prefix_passes", "prior_state"]


def make_engine(kind: str, model, tokenizer, rows: RowState | None, batch_size: int, profile: dict | None = None,
                progress=None, feed: Feed | None = None) -> Engine:
    """``eval.engine``: plain, pool, or auto (the pool on a CPU, plain elsewhere: the pool is not measured
    off the CPU); ``profile`` overrides the device profile's fields. ``feed`` (a server's rows joining while
    it decodes) needs the pool; the plain engine takes only its per-row limits."""
    device = next(model.parameters()).device
    if kind == "auto":
        kind = "pool" if device.type == "cpu" or feed is not None else "plain"
    if kind == "plain":
        return PlainEngine(model, tokenizer, rows, batch_size, progress, feed)
    return PoolEngine(model, tokenizer, rows, batch_size, progress, device_profile(device, profile), feed=feed)
