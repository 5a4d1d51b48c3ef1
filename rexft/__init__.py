"""rexft: multitask parameter-efficient finetuning with mixtures of rank-one experts (T-REX, MoDE)."""

from rexft.adapters import (
    adapter_state_dict,
    inject_adapters,
    load_adapter,
    parameter_report,
    save_adapter,
    set_prior,
)

__all__ = ["inject_adapters", "set_prior", "adapter_state_dict", "save_adapter", "load_adapter", "parameter_report"]
__version__ = "0.1.0"
