from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from ..common import check_adapter_name, find_decoder_blocks, parse_layers
from .layer import NOT_MERGEABLE, LogGateBlock, LogGateLayer


def hidden_size_of(model: nn.Module) -> int:
    """Width of the residual stream, from the model config (``hidden_size`` / ``n_embd`` / ``d_model``)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size/n_embd/d_model")


class LogGateModel(BaseTuner):
    """PEFT tuner that wraps decoder blocks in :class:`LogGateBlock` (see :class:`~peft_ext.GateConfig`).

    A sparse adapter (``num_gates`` set) must go through :func:`peft_ext.select_gates` before it is trained: a forward
    in train mode with gradients enabled on an adapter whose mask is still empty raises instead of silently training nothing. The
    check is a forward pre-hook on the wrapped model, because a ``PeftModel`` without ``task_type`` calls that model
    directly rather than this tuner.
    """

    prefix: str = "loggate_"
    tuner_layer_cls = LogGateLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._block_targets: Optional[set[str]] = None
        self._selected_adapters: set[str] = set()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._selection_hook = self.model.register_forward_pre_hook(self._check_sparse_adapters_selected)

    # -- injection ------------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # targets are resolved structurally in inject_adapter

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        if config.target_modules is None:
            path, blocks = find_decoder_blocks(model)
            self._block_targets = {f"{path}.{i}" for i in parse_layers(config.layers, len(blocks))}
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        finally:
            self._block_targets = None

    def _check_target_module_exists(self, peft_config, key: str):
        if self._block_targets is None:
            return check_target_module_exists(peft_config, key)
        return key in self._block_targets

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LogGateLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = LogGateBlock(target, adapter_name, peft_config, hidden_size=hidden_size_of(self.model))
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(new_module, LogGateLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unloading: put the plain block back (PEFT's version assumes the block has a `.weight`)
            setattr(parent, child_name, new_module)

    # -- runtime --------------------------------------------------------------------------------------------------
    def gate_layers(self) -> list[tuple[str, LogGateLayer]]:
        """``(module name, layer)`` of every gated block, in model order."""
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, LogGateLayer)]

    def set_selected(self, adapter_name: str, selected: bool = True) -> None:
        """Record whether ``adapter_name``'s sparse gates have been chosen (see :func:`peft_ext.select_gates`)."""
        if selected:
            self._selected_adapters.add(adapter_name)
        else:
            self._selected_adapters.discard(adapter_name)

    def _check_sparse_adapters_selected(self, *_: Any) -> None:
        if not (self.model.training and torch.is_grad_enabled()):
            return
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.num_gates is None or name in self._selected_adapters:
                continue
            layers = [layer for _, layer in self.gate_layers() if name in layer.loggate_mask]
            if not any(layer.loggate_raw[name].requires_grad for layer in layers):
                continue
            if any(bool(layer.loggate_mask[name].any()) for layer in layers):
                self._selected_adapters.add(name)  # e.g. a loaded adapter whose mask came with the weights
                continue
            raise RuntimeError(
                f"adapter {name!r} has a sparse budget (num_gates={config.num_gates}) but no gates were selected, so "
                "training it would change nothing. Call peft_ext.select_gates(model, batches) first, or use "
                "GateConfig(num_gates=None) to train every gate."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.set_selected(adapter_name, False)

    # -- merging is impossible --------------------------------------------------------------------------------------
    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any):
        if merge:
            raise ValueError(NOT_MERGEABLE)
        self._selection_hook.remove()
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

