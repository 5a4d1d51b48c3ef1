"""rexft: multitask parameter-efficient finetuning with mixtures of rank-one experts (T-REX, MoDE).

The library's entry points (``rexft.inject_adapters`` and the rest of ``__all__``) are rexft.adapters',
imported on first use, so that the command line starts without torch (``rexft.cli`` decides the process's
allocator settings before anything large is allocated).
"""

__all__ = ["inject_adapters", "set_prior", "adapter_state_dict", "save_adapter", "load_adapter", "parameter_report"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``rexft.inject_adapters`` and the rest of ``__all__``; ``rexft.adapters`` and any other submodule,
    imported on first use as ``import rexft`` once did."""
    import importlib

    if name in __all__:
        return getattr(importlib.import_module("rexft.adapters"), name)
    try:
        return importlib.import_module(f"rexft.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"rexft.{name}":
            raise
        raise AttributeError(f"module 'rexft' has no attribute '{name}'") from None
