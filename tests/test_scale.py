"""Scaling out on CPU gloo: two "nodes" on one host (torchrun and accelerate launch, both node ranks started
here), FSDP2 (with activation checkpointing, and over a 4-bit base), and a checkpoint resumed on another
number of processes. Every run is compared with one process of the same global batch; each test prints its
max |delta loss| (pytest -s)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, ROOT, tiny_model
from test_train import losses, prior, smoke_run  # noqa: F401  (prior: the module's cluster-prior fixture)

COMMON = ["trainer.max_steps=4", "trainer.save_every=2", "adapter.dropout=0", "trainer.mixed_precision=no"]
NODE_TIMEOUT = 300  # seconds for both node ranks together; a hung rendezvous fails the test, it does not hang CI
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

# Imported by every Python process of a run (PYTHONPATH): logs each file or folder it creates, writes, renames
# or removes under WRITE_AUDIT_ROOT, one log per process named by its RANK ("launcher": torchrun's agent).
# Files written by native code (torch.save's zip writer, safetensors) are not seen; their folders' creation
# and renames are.
AUDIT_HOOK = r'''
import os, sys
_root = os.environ.get("WRITE_AUDIT_ROOT")
if _root:
    _log = open(os.path.join(os.environ["WRITE_AUDIT_LOG"], f"{os.environ.get('RANK', 'launcher')}.{os.getpid()}.log"),
                "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE)
            paths = [path] if writes else []
        elif event in ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.mkdir"):
            paths = list(args[:2])
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path.startswith(_root) and not (event == "os.mkdir" and os.path.isdir(path)):
                    _log.write(f"{event}\t{path}\n")

    sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict, timeout: float = NODE_TIMEOUT) -> None:
    """Start every command (one per node rank) in its own process group and wait for all; on a failure or a
    timeout kill every group and fail with each one's output tail."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in commands]
    deadline, failed = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs) and failed is None:
        failed = next((p for p in procs if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    failed = failed or next((p for p in procs if p.returncode != 0), None)
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        tails = "\n".join(f"--- node rank {r} (exit {p.wait()}):\n{p.stdout.read()[-3000:]}" for r, p in enumerate(procs))
        pytest.fail(("the node ranks did not finish within %d s (a hung rendezvous?)" % timeout
                     if failed == "timeout" else "a node rank failed") + "\n" + tails)
    for p in procs:
        p.stdout.close()


def prepared_run_dir(tmp_path, prior, name):  # noqa: F811
    """A run directory holding the data split and prior, as smoke_run makes them."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    shutil.copytree(prior, run_dir / "prior")
    shutil.copytree(prior.parent / "data", run_dir / "data")
    return run_dir


def files_under(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def assert_same_training(run_dir: Path, reference: Path, atol: float = 1e-5) -> float:
    """Same loss curve and the same adapter (names, shapes, dtypes, config, values) as ``reference``;
    returns max |delta loss|."""
    mine, theirs = losses(run_dir), losses(reference)
    assert len(mine) == len(theirs) and mine == pytest.approx(theirs, abs=atol)
    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (b[key].shape, b[key].dtype) == (a[key].shape, a[key].dtype)  # gathered, not one process's shard
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=atol)
    config, own = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (reference, run_dir))
    assert own.pop("final_loss") == pytest.approx(config.pop("final_loss"), abs=atol)
    for prior in (own.get("prior"), config.get("prior")):  # a prior built in the run: its own timings
        if prior:
            prior.pop("seconds")
    assert own == config  # the base model's fingerprint included (FSDP2 renames the model's class)
    return max(abs(x - y) for x, y in zip(mine, theirs))


@pytest.fixture(scope="module")
def single(tmp_path_factory, prior):  # noqa: F811
    """The reference: one process with the global batch (8) of the multi-process runs (2 x 4)."""
    run_dir, _ = smoke_run(tmp_path_factory.mktemp("single"), prior, "single", *COMMON, "trainer.batch_size=8")
    return run_dir


def node_commands(launcher: str, port: int, args: list[str]) -> list[list[str]]:
    if launcher == "torchrun":
        base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
        return [[*base, "--node_rank", str(rank), "-m", "rexft", *args] for rank in (0, 1)]
    # accelerate launch: on a CPU-only host --multi_gpu is what starts gloo processes (through torchrun)
    base = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [[*base, "--machine_rank", str(rank), "-m", "rexft", *args] for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_train_as_one_process_and_only_rank_0_writes(tmp_path, prior, single, launcher):  # noqa: F811
    """From an empty run directory: rank 0 runs data and cluster-prior while the other rank waits for it."""
    run_dir = tmp_path / f"nodes-{launcher}"
    audit = tmp_path / "audit"
    (audit / "logs").mkdir(parents=True)
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WRITE_AUDIT_ROOT": str(run_dir), "WRITE_AUDIT_LOG": str(audit / "logs"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")]))}
    args = ["train", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={DATA}", *COMMON, "trainer.batch_size=4"]
    run_together(node_commands(launcher, free_port(), args), env)

    delta = assert_same_training(run_dir, single)
    print(f"{launcher} 2 nodes x 1 process vs 1 process: max |delta loss| = {delta:.2e}")
    records = {log.name.split(".")[0]: log.read_text().splitlines() for log in (audit / "logs").glob("*.log")}
    assert records.get("0"), "the audit hook saw no write by rank 0 (is it imported?)"
    others = {rank: lines for rank, lines in records.items() if rank != "0" and lines}
    assert not others, f"processes other than rank 0 wrote into the run directory: {others}"
    # The same files as one process writes (and the configs of the two stages run first), none left
    # half-written or temporary, each one readable.
    assert files_under(run_dir) == files_under(single) | {"config.data.yaml", "config.cluster-prior.yaml"}
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    for path in run_dir.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            assert load_file(str(path))
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-2", "step-4"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,before,after", [("default", 2, 1), ("fsdp", 1, 2)], ids=["ddp-2-to-1", "fsdp-1-to-2"])
def test_a_checkpoint_resumes_on_another_world_size(tmp_path, prior, single, strategy, before, after):  # noqa: F811
    """Stopped after step 3 (checkpoint step-2), resumed with the other number of processes and the same
    global batch: the loss curve and adapter are those of the uninterrupted run. The FSDP2 case trains its
    last steps sharded over 2 processes with activation checkpointing and saves the gathered adapter."""
    def run(world, *extra):
        launcher = TORCHRUN_2 if world == 2 else None
        return smoke_run(tmp_path, prior, "resumed", *COMMON, f"trainer={strategy}", f"trainer.batch_size={8 // world}",
                         *extra, launcher=launcher)

    run_dir, _ = run(before, "trainer.stop_after_steps=3")
    assert json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())["world_size"] == before
    run(after, "trainer.resume=true", *(["trainer.gradient_checkpointing=true"] if strategy == "fsdp" else []))
    delta = assert_same_training(run_dir, single)
    print(f"{strategy} checkpoint of {before} process(es) resumed on {after}: max |delta loss| = {delta:.2e}")
    saved = torch.load(run_dir / "checkpoints" / "step-4" / "optimizer.pt", weights_only=False)
    assert saved["keyed_by"] == "name"  # the gathered optimizer state, by parameter name: any world size loads it
    adapter = load_file(str(run_dir / "checkpoints" / "step-4" / "adapter.safetensors"))
    state = saved["optimizer"]["state"]
    assert set(state) == set(adapter) and all(state[k]["exp_avg"].shape == adapter[k].shape for k in adapter)


def fake_accelerator(world: int, deepspeed: bool):
    return SimpleNamespace(num_processes=world, state=SimpleNamespace(deepspeed_plugin=object() if deepspeed else None))


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    """A different global batch (the data order and schedule would shift) and ZeRO state partitioned over
    another world size: one error each, naming what to do."""
    from rexft.config import TrainerConfig
    from rexft.errors import RexftError
    from rexft.train import check_resumable

    ckpt = tmp_path / "step-2"
    (ckpt / "deepspeed").mkdir(parents=True)
    written = {"step": 2, "world_size": 2, "global_batch": 8}
    check_resumable(ckpt, written, fake_accelerator(2, True), TrainerConfig(batch_size=4))
    with pytest.raises(RexftError, match=r"global batch of 8 \(2 processes\).*trainer.batch_size x trainer.grad_accum = 8"):
        check_resumable(ckpt, written, fake_accelerator(1, False), TrainerConfig(batch_size=4))
    with pytest.raises(RexftError, match=r"partitioned over 2 processes and this launch has 1.*Resume with 2 processes"):
        check_resumable(ckpt, written, fake_accelerator(1, True), TrainerConfig(batch_size=8))
    with pytest.raises(RexftError, match=r"holds DeepSpeed ZeRO state.*trainer.deepspeed"):
        check_resumable(ckpt, written, fake_accelerator(1, False), TrainerConfig(batch_size=8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rexft.modeling import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_fsdp2_shards_a_4bit_base(tmp_path, prior, model_dir):  # noqa: F811
    """FSDP+QLoRA: NF4 weights stored in the compute dtype are sharded (Accelerate warns when it has to keep
    uint8 ones whole) and train as one process does on the same 4-bit base."""
    pytest.importorskip("bitsandbytes")
    qlora = ["trainer.max_steps=2", *COMMON[2:], f"model.name_or_path={model_dir}", "model.quantization=nf4"]
    one, _ = smoke_run(tmp_path, prior, "nf4-one", *qlora, "trainer.batch_size=8")
    two, result = smoke_run(tmp_path, prior, "nf4-fsdp", *qlora, "trainer=fsdp", "trainer.batch_size=4", launcher=TORCHRUN_2)
    assert "non-floating frozen Params4bit" not in result.stderr
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    print(f"FSDP2 over NF4 (2 processes) vs 1 process: max |delta loss| = "
          f"{max(abs(a - b) for a, b in zip(losses(two), losses(one))):.2e}")
