"""``rexft harness ARGS``: lm-evaluation-harness's own command line (``lm-eval run ARGS``, which calls
``lm_eval.simple_evaluate``) with the ``rexft`` model registered and rexft's task definitions included.

One argument is rexft's: ``--local_dir DIR``, the folder of ``<task>/validation.jsonl`` the task YAMLs
read (default: $REXFT_DATA, else ../shared/data as in the recipes). rexft_chat tasks are chat prompts:
``--apply_chat_template`` is added for them when missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from rexft.errors import RexftError

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--local_dir", default=os.environ.get("REXFT_DATA", "../shared/data"))
    parser.add_argument("--include_path", default=None)
    parser.add_argument("--tasks", "-t", nargs="+", default=[])
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest or not argv:
        print(f"usage: rexft harness [--local_dir DIR] LM_EVAL_ARGS...\n\n{__doc__}\nlm-eval's arguments follow.\n")
        rest = ["--help"]
    try:
        from lm_eval._cli import HarnessCLI

        from rexft.harness import task_dir_for
    except ImportError as err:
        print(f"rexft: error: {err}", file=sys.stderr)
        return 2
    local_dir = Path(ours.local_dir)
    if not local_dir.is_dir():
        print(f"rexft: error: --local_dir {local_dir} is not a folder (of <task>/validation.jsonl)", file=sys.stderr)
        return 2
    tasks = [t for group in ours.tasks for t in group.split(",") if t]
    chat = [t for t in tasks if t.startswith("rexft_chat")]
    if chat and len(chat) < len(tasks):
        print("rexft: error: rexft_chat tasks are scored in the chat template (--apply_chat_template) and the "
              "others are not: run them in separate commands", file=sys.stderr)
        return 2
    if chat and "--apply_chat_template" not in rest:
        log.warning("rexft_chat tasks are chat prompts: adding --apply_chat_template")
        rest.append("--apply_chat_template")
    with tempfile.TemporaryDirectory(prefix="rexft-harness-tasks-") as folder:
        include = str(task_dir_for(local_dir, Path(folder)))
        if ours.include_path:
            include = f"{include}:{ours.include_path}"
        sys.argv = ["lm-eval", "run", *(["--tasks", ",".join(tasks)] if tasks else []), "--include_path", include, *rest]
        cli = HarnessCLI()
        try:
            cli.execute(cli.parse_args())
        except RexftError as err:  # the run directory, its adapter or its prior: one line, as every command
            print(f"rexft: error: {err}", file=sys.stderr)
            return 2
    return 0
