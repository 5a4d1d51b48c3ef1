"""The process the command line runs in: glibc's malloc keeps the memory a training step frees.

PyTorch on a CPU allocates and frees tensors of megabytes every step (activations, their gradients, a
decoding batch's cache). glibc serves each block above its mmap threshold (128 KiB, rising to at most 32 MiB
as such blocks are freed) with fresh pages from the kernel, and hands freed memory at the top of its heap back
past its trim threshold, so every step pays a page fault for each 4 KiB of those tensors again, and the
kernel zeroes each page. That is why PyTorch's CPU tuning guides preload jemalloc or tcmalloc. glibc has its
own switches for it, read only when a process starts: ``MALLOC_MMAP_THRESHOLD_`` (blocks below it come from
the heap) and ``MALLOC_TRIM_THRESHOLD_`` (free memory the heap keeps). So ``rexft`` (the console script and
``python -m rexft``) re-executes itself once with them set, before it imports torch. It keeps the same
process id, the same interpreter flags and the same arguments, so torchrun, accelerate and SLURM see no
difference. The process's resident memory then stays at its peak instead of shrinking between steps, as it
does under jemalloc.

Nothing is changed where either variable is set already, where jemalloc or tcmalloc is preloaded, off
glibc, or with ``REXFT_MALLOC=system``. Measured: BENCHMARKS.md, section 1.
"""

from __future__ import annotations

import os
import platform
import sys

HEAP = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def kept_heap_env(environ=os.environ) -> dict[str, str] | None:
    """The environment with glibc keeping freed memory, or None where the process is to be left as it is."""
    preloaded = environ.get("LD_PRELOAD", "")
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environ.get("REXFT_MALLOC") == "system"
            or any(name in environ for name in HEAP) or "jemalloc" in preloaded or "tcmalloc" in preloaded):
        return None
    return {**environ, **HEAP}


def reexec_with_kept_heap() -> None:
    """Re-executes this process (same interpreter, flags and arguments) with ``kept_heap_env``; returns where
    nothing is to change."""
    env = kept_heap_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
