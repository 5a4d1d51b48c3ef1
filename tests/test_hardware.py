"""Nothing tuned to one machine: dtypes, mixed precision and the eval pool's costs follow what the device supports."""

import pytest
import torch

import rexft.modeling as modeling
from rexft.errors import RexftError
from rexft.inference import DeviceProfile, device_profile


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU torch reports: (capability, /proc/cpuinfo flags)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def as_if(capability: str, flags: set[str]):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(modeling, "cpu_flags", lambda: flags)
    return as_if


def test_bf16_is_native_only_where_the_cpu_computes_it(cpu, monkeypatch):
    cpu("AVX512", {"avx2", "avx512f", "avx512_bf16"})
    assert modeling.native_bf16("cpu")
    cpu("AVX512", {"avx2", "avx512f", "amx_bf16", "amx_tile"})  # AMX
    assert modeling.native_bf16("cpu")
    cpu("AVX512", {"avx2", "avx512f"})  # AVX-512 without its bf16 instructions: emulated
    assert not modeling.native_bf16("cpu")
    cpu("AVX2", {"avx2", "avx512f", "avx512_bf16"})  # ATEN_CPU_CAPABILITY=avx2 holds torch to AVX2 kernels
    assert not modeling.native_bf16("cpu")
    cpu("AVX512", {"avx512f", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN held below AVX512_CORE_BF16
    assert not modeling.native_bf16("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert modeling.native_bf16("cpu")


def test_bf16_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert modeling.native_bf16("cuda") is supported


def test_route_dtype_auto_picks_bf16_only_where_native(cpu):
    model = torch.nn.Linear(2, 2)
    cpu("AVX512", {"avx512_bf16"})
    assert modeling.compute_dtype("auto", model) is torch.bfloat16
    cpu("AVX2", {"avx2"})
    assert modeling.compute_dtype("auto", model) is None  # the model's own float32
    assert modeling.compute_dtype("bfloat16", model) is torch.bfloat16  # asked for: given
    cpu("AVX512", {"avx512_bf16"})
    assert modeling.compute_dtype("auto", model.to(torch.float16)) is None  # already half precision


def test_the_pool_profile_is_chosen_by_device_and_overridable():
    assert device_profile("cpu") == DeviceProfile()
    gpu = device_profile("cuda")
    assert gpu.run_cost > DeviceProfile().run_cost and gpu.decode_batch_size > DeviceProfile().decode_batch_size
    assert device_profile("cpu", {"decode_chunk": 8}).decode_chunk == 8
    with pytest.raises(RexftError, match="decode_chunks"):
        device_profile("cpu", {"decode_chunks": 8})


def test_mixed_precision_auto_trains_in_bf16_only_where_native(cpu, monkeypatch):
    from rexft.train import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu("AVX512", {"avx512f", "avx512_bf16"})
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("auto", deepspeed=True) == "no"  # DeepSpeed's CPU path stays float32
    assert resolve_mixed_precision("no") == "no"
    cpu("AVX512", {"avx512f"})  # AVX-512 without bf16 instructions
    assert resolve_mixed_precision("auto") == "no"
    cpu("AVX2", {"avx2"})
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"  # asked for: given, emulated or not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", deepspeed=True) == "bf16"


def test_machine_summary_names_what_figures_depend_on():
    line = modeling.machine_summary(probe=False)
    assert f"torch {torch.__version__}" in line and "transformers " in line and "native bf16 " in line
    assert modeling.matmul_gflops(n=64, seconds=0.01) > 0
