"""Task registry: every module in this folder except ``common`` is a task loader (see common.py)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from types import ModuleType

from rexft.errors import RexftError


@lru_cache(maxsize=None)
def task_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")


def get_task(name: str) -> ModuleType:
    if name not in task_names():
        raise RexftError(f"unknown task '{name}'; valid tasks: {', '.join(task_names())}")
    return importlib.import_module(f"rexft.tasks.{name}")
