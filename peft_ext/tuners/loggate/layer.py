from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..common import ADAPTER_DTYPE, module_device

NOT_MERGEABLE = (
    "log-gate adapters scale decoder-block outputs (h' = exp(s) * h, after the residual add); that is not an edit of "
    "any weight, so it cannot be merged. Keep the adapter attached, or call `unload()` to get the base model back."
)


def log_gates(raw: torch.Tensor, mask: torch.Tensor, bound: float) -> torch.Tensor:
    """``s = bound · tanh(raw)`` where ``mask``, exactly 0 elsewhere (in ``raw``'s dtype)."""
    return (torch.tanh(raw) * bound).masked_fill(~mask, 0.0)


def apply_log_gate(output, log_gate: torch.Tensor, hidden_size: int, block_name: str = "the block"):
    """A block's output with its hidden state multiplied by ``exp(log_gate)``, computed in fp32.

    ``output`` is the hidden state or a tuple whose first element is it (the rest is passed through).
    """
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor) or hidden.shape[-1] != hidden_size:
        raise TypeError(
            f"{block_name} returned {type(hidden).__name__} {tuple(getattr(hidden, 'shape', ()))}; log-gates need a "
            f"hidden-state tensor of width {hidden_size} (or a tuple starting with one). Check `target_modules`."
        )
    gated = (hidden.to(ADAPTER_DTYPE) * torch.exp(log_gate.to(hidden.device))).to(hidden.dtype)
    return (gated, *output[1:]) if isinstance(output, tuple) else gated


class LogGateLayer(BaseTunerLayer):
    """Per-adapter signed log-gates on one block output: ``s = bound · tanh(raw)`` where ``mask``, else 0.

    ``loggate_raw`` (fp32, trainable) and ``loggate_mask`` (bool, persistent buffer: which gates may leave zero) hold
    one entry per adapter; active adapters' log-gates add, i.e. their gates multiply.
    """

    adapter_layer_names = ("loggate_raw",)
    other_param_names = ("loggate_mask", "loggate_bound")

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.loggate_raw = nn.ParameterDict({})
        self.loggate_mask = BufferDict({}, persistent=True)
        self.loggate_bound: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config) -> None:
        device = module_device(self.base_layer)
        dense = config.num_gates is None
        mask = torch.full((self.hidden_size,), dense, dtype=torch.bool, device=device)
        raw = torch.zeros(self.hidden_size, dtype=ADAPTER_DTYPE, device=device)
        if config.init == "random":
            raw.uniform_(-1.0, 1.0)
        self.loggate_raw[adapter_name] = nn.Parameter(raw)
        self.loggate_mask[adapter_name] = mask
        self.loggate_bound[adapter_name] = float(config.max_log_gate)
        self.set_adapter(self.active_adapters)

    def log_gate(self, adapter_name: str) -> torch.Tensor:
        """``s`` of one adapter (fp32, shape ``[hidden]``); unselected gates are exactly 0 and get no gradient."""
        raw = self.loggate_raw[adapter_name].to(ADAPTER_DTYPE)  # stays fp32 math even after model.to(bfloat16)
        return log_gates(raw, self.loggate_mask[adapter_name], self.loggate_bound[adapter_name])

    def active_log_gate(self) -> Optional[torch.Tensor]:
        """Sum of the active adapters' log-gates on this block, or None when none of them lives here."""
        total = None
        for name in self.active_adapters:
            if name in self.loggate_raw:
                s = self.log_gate(name)
                total = s if total is None else total + s
        return total

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        """Nothing is ever merged (see :meth:`merge`)."""


class LogGateBlock(nn.Module, LogGateLayer):
    """A decoder block whose output hidden state is multiplied by ``exp(s)`` (computed in fp32)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, hidden_size: int) -> None:
        super().__init__()
        LogGateLayer.__init__(self, base_layer, hidden_size)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, *args: Any, **kwargs: Any):
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        log_gate = self.active_log_gate()
        if log_gate is None:
            return output
        return apply_log_gate(output, log_gate, self.hidden_size, type(self.base_layer).__name__)

    def __getattr__(self, name: str):
        # model code sometimes reads block attributes (e.g. `decoder_layer.attention_type`): answer for the block
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __repr__(self) -> str:
        return "loggate." + super().__repr__()
