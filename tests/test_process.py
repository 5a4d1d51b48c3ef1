"""The command line's process: glibc keeps freed memory (rexft.process), set by one re-exec of itself."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rexft.process import HEAP, kept_heap_env

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


@glibc
def test_the_heap_is_kept_unless_the_user_chose_otherwise():
    assert {k: kept_heap_env({"PATH": "/bin"})[k] for k in HEAP} == HEAP
    assert kept_heap_env({"MALLOC_TRIM_THRESHOLD_": "0"}) is None  # the user's own setting wins
    assert kept_heap_env({"REXFT_MALLOC": "system"}) is None
    assert kept_heap_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None


@glibc
def test_the_program_reexecutes_itself_once_with_the_same_pid_flags_and_arguments():
    """``python -X utf8 -c CODE an-arg``: the re-exec keeps the process id, the interpreter's flags and the
    arguments, sets glibc's switches, and happens once. (What it buys: BENCHMARKS.md, section 1.)"""
    import os

    code = ("import os, sys\n"
            "from rexft.process import reexec_with_kept_heap\n"
            "print(os.getpid(), os.environ.get('MALLOC_MMAP_THRESHOLD_'), sys.flags.utf8_mode, sys.argv[1:], flush=True)\n"
            "reexec_with_kept_heap()\n")
    env = {k: v for k, v in os.environ.items() if k not in HEAP and k not in ("REXFT_MALLOC", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-X", "utf8", "-c", code, "an-arg"], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    pid = out[0].split()[0]
    assert out == [f"{pid} None 1 ['an-arg']", f"{pid} {HEAP['MALLOC_MMAP_THRESHOLD_']} 1 ['an-arg']"]
    env["REXFT_MALLOC"] = "system"
    assert len(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.splitlines()) == 1
