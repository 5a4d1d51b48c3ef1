"""What the pooled engine trades off on one kind of device, per device type and overridable (``eval.profile``)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rexft.errors import RexftError


@dataclass(frozen=True)
class DeviceProfile:
    """The CPU's figures were measured (2-core AVX-512 machine, SmolLM2-135M); the accelerator's are
    starting points (not yet measured)."""

    run_cost: int = 48  # a forward's fixed cost (every weight read once) in tokens: ~75 ms against ~1.6 ms a token
    call_cost: int = 512  # one attention call costs about as much as this many (row, key position) pairs
    decode_chunk: int = 4  # tokens decoded between the moments rows leave and join the decoding batch
    decode_batch_size: int = 64  # rows decoding together (eval.decode_batch_size overrides)


# An accelerator runs a forward's weights in parallel: its fixed cost is worth far more tokens, and an
# attention call's launch far more (row, key) pairs, so it batches more and splits less.
PROFILES = {"cpu": DeviceProfile(),
            "accelerator": DeviceProfile(run_cost=1024, call_cost=1 << 16, decode_chunk=16, decode_batch_size=256)}


def device_profile(device, overrides: dict | None = None) -> DeviceProfile:
    """The profile of ``device``'s type (every type but the CPU: an accelerator's), with ``overrides``."""
    names = [f.name for f in fields(DeviceProfile)]
    unknown = set(overrides or {}) - set(names)
    if unknown:
        raise RexftError(f"eval.profile has unknown key(s) {sorted(unknown)}; valid: {names}")
    base = PROFILES["cpu" if torch.device(device).type == "cpu" else "accelerator"]
    return replace(base, **(overrides or {}))
