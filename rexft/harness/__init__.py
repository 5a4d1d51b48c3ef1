"""lm-evaluation-harness with rexft: a ``rexft`` model that routes each request by its prior, and task
definitions for the 14 built-in datasets that read local files.

    rexft harness --model rexft --model_args run_dir=runs/demo --tasks rexft_harness     (lm-eval's arguments)

    import lm_eval, rexft.harness                                                      (from Python)
    from lm_eval.tasks import TaskManager
    lm_eval.simple_evaluate(model="rexft", model_args="run_dir=runs/demo", tasks=["rexft_boolq"],
                            task_manager=TaskManager(include_path=str(rexft.harness.task_dir())))

model.py   ``RexftLM``, registered with lm-eval as ``rexft``: a run directory's base model and adapter
           (``run_dir=``, ``use_adapter=false`` for the base model alone), each request's prior set before
           its forward (loglikelihood, loglikelihood_rolling, generate_until; batched as HFLM batches).
tasks/     lm-eval task YAMLs: ``rexft_<task>`` (tag ``rexft_harness``) are lm-eval's own zero-shot
           definitions of the 14 datasets, reading ``<data.local_dir>/<task>/validation.jsonl``;
           ``rexft_chat_<task>`` (group ``rexft_chat``, with --apply_chat_template) are rexft's chat-style
           prompts (``data.prompt_style=chat``), laid out by rexft's own task loaders (chat.py).
run.py     ``rexft harness``: lm-eval's command line with the model registered and the task folder included.

Prior-free adapters need none of this: a LoRA export loads in lm-eval's own ``hf`` model
(``--model hf --model_args pretrained=BASE,peft=runs/R/export/...``).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA = "../shared/data"  # the data folder the shipped task YAMLs read (the recipes' data.local_dir)


def task_dir() -> Path:
    """The shipped task YAMLs (they read ``../shared/data`` relative to the working directory)."""
    return Path(__file__).parent / "tasks"


def task_dir_for(local_dir: str | Path, out: Path) -> Path:
    """A copy of the task YAMLs in ``out`` that read ``local_dir`` (absolute) instead of ``../shared/data``."""
    out.mkdir(parents=True, exist_ok=True)
    target = Path(local_dir).expanduser().resolve().as_posix()
    for source in task_dir().iterdir():
        if source.is_file():
            (out / source.name).write_text(source.read_text().replace(f"{DEFAULT_DATA}/", f"{target}/"))
    return out


try:
    from rexft.harness.model import RexftLM  # registers the ``rexft`` model with lm-eval
except ImportError as err:  # lm-eval is an optional extra
    if err.name is None or not err.name.startswith("lm_eval"):
        raise
    raise ImportError("rexft.harness needs lm-evaluation-harness: pip install 'rexft[harness]'") from err

__all__ = ["RexftLM", "task_dir", "task_dir_for"]
