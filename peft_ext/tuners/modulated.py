"""Shared machinery of the low-rank families with a runtime coefficient ``c`` (modulated LoRA, modulated PiSSA).

Every such layer computes ``y' = y + Σ_active c_a · delta_a(x)`` on top of the base layer's output ``y``: the delta in
fp32, added once in ``y``'s dtype. Adapters at ``c = 0`` are skipped (no adapter compute; ``c = 0`` everywhere returns
``y`` itself). A family implements ``delta(adapter, x)`` and ``delta_weight(adapter)`` (the dense ``d_out x d_in`` matrix
with ``delta(x) = x @ delta_weightᵀ``); merging, coefficients and targeting live here once.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from .common import ADAPTER_DTYPE, check_adapter_name, dequantized_weight, find_decoder_blocks, resolve_adapter, tuner_of


@dataclass
class ModulatedConfig(PeftConfig):
    """Fields shared by the modulated families (targets, depth band, default coefficient)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={
            "help": "Linear modules to adapt: names (exact or suffix), a regex, or 'all-linear' (every linear layer "
            "except the output layer)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to adapt (names, suffixes or a regex)."}
    )
    layer_range: Optional[tuple[float, float]] = field(
        default=None,
        metadata={
            "help": "Fractional depth band (lo, hi) over the decoder blocks: block i of N is adapted when "
            "lo*N <= i < hi*N. Modules outside the block stack are unaffected. None: all blocks."
        },
    )
    coefficient: float = field(
        default=1.0,
        metadata={"help": "Default runtime coefficient c (y + c*delta). Not saved as a tensor; set it at run time "
                  "with peft_ext.set_coefficient or the peft_ext.coefficient context manager."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save in full (PEFT semantics)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.layer_range is not None:
            lo, hi = self.layer_range
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"layer_range={self.layer_range}: need 0 <= lo < hi <= 1")
            self.layer_range = (float(lo), float(hi))
        if not math.isfinite(self.coefficient):
            raise ValueError(f"coefficient={self.coefficient}: must be finite")


class ModulatedLayer(BaseTunerLayer):
    """Mixin: coefficients, the forward skeleton and merging for a wrapped linear layer."""

    # subclasses name their coefficient dict in other_param_names, e.g. "mlora_coefficient"
    coefficient_attr: str

    def _init_modulated(self, base_layer: nn.Module) -> None:
        # base_layer may itself be a tuner layer (a history bake stacked underneath); the linear is its innermost layer
        linear = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(linear, nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
            raise TypeError(f"{type(linear).__name__} is not a linear layer; target linear modules only")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantization_backend = resolve_quantization_backend(linear)
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged_deltas: dict[str, torch.Tensor] = {}

    def get_base_weight(self) -> torch.Tensor:
        """The base weight as a float tensor (dequantised for bitsandbytes layers; see ``dequantized_weight``)."""
        return dequantized_weight(self)

    @property
    def coefficients(self) -> dict[str, float]:
        return getattr(self, self.coefficient_attr)

    def set_coefficient(self, adapter_name: str, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"coefficient must be finite, got {value}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged at c={self.coefficients[adapter_name]}; unmerge first")
        self.coefficients[adapter_name] = float(value)

    def _init_adapter_containers(self) -> None:
        """Create the family's per-adapter containers (ParameterDicts, BufferDicts, dicts)."""
        raise NotImplementedError

    def _loaded_from_state_dict(self, state_dict, prefix: str) -> None:
        """Called after a state dict was loaded into this layer (keys start with ``prefix``)."""

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``delta_a(x)`` in fp32 for an fp32 input, without the coefficient."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense fp32 ``d_out x d_in`` matrix of ``delta_a`` (without the coefficient)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return y
        scaled = [(name, c) for name in self.active_adapters if (c := self.coefficients.get(name, 0.0)) != 0.0]
        if not scaled:
            return y
        x = x.to(ADAPTER_DTYPE)
        total = sum(self.delta(name, x) * c for name, c in scaled)
        if self.quantization_backend is not None:
            y = self.quantization_backend.maybe_clone_base_result(y)
        return y + total.to(y.dtype)

    # -- merging at the current coefficient ---------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.coefficients:
                continue
            delta = self.delta_weight(name) * self.coefficients[name]
            weight = self.get_base_weight()
            merged = weight.to(ADAPTER_DTYPE) + delta.to(weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} produces non-finite weights; nothing was merged")
            self.set_base_weight(merged.to(weight.dtype))
            self._merged_deltas[name] = delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self._merged_deltas.pop(name)
            weight = self.get_base_weight()
            self.set_base_weight((weight.to(ADAPTER_DTYPE) - delta.to(weight.device)).to(weight.dtype))

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """PEFT's unload hook: hand back the directly wrapped module, so a history bake stacked below stays in place."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.base_layer


class ModulatedLinear(nn.Module):
    """The ``nn.Module`` half of a family's linear wrapper: ``class XLinear(ModulatedLinear, XLayer)``.

    Wraps ``nn.Linear`` and bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` alike (the adapter acts on the output).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **options: Any) -> None:
        super().__init__()
        self._init_modulated(base_layer)
        self._init_adapter_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **options)

    forward = ModulatedLayer.forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # defined here because nn.Module precedes the family mixin in the MRO and would shadow it there
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._loaded_from_state_dict(state_dict, prefix)

    def __repr__(self) -> str:
        return self.coefficient_attr.split("_")[0] + "." + super().__repr__()


class ModulatedTuner(BaseTuner):
    """Shared tuner logic: PEFT target matching plus the fractional depth band ``layer_range``."""

    layer_cls: type  # the family's concrete layer class (wraps nn.Linear and bnb linears)
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        self._band = None
        if getattr(config, "layer_range", None) is not None:
            path, blocks = find_decoder_blocks(model)
            lo, hi = config.layer_range
            indices = [i for i in range(len(blocks)) if lo * len(blocks) <= i < hi * len(blocks)]
            if not indices:
                raise ValueError(
                    f"layer_range={tuple(config.layer_range)} selects no block of the {len(blocks)} in {path}"
                )
            self._band = (re.compile(rf"^{re.escape(path)}\.(\d+)\."), set(indices))
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        finally:
            self._band = None

    def _check_target_module_exists(self, peft_config, key: str):
        matched = check_target_module_exists(peft_config, key)
        if matched and self._band is not None:
            pattern, indices = self._band
            block = pattern.match(key)
            if block is not None and int(block.group(1)) not in indices:
                return False  # inside the block stack but outside the band; modules outside the stack are kept
        return matched

    def layer_options(self, peft_config, key: str) -> dict[str, Any]:
        """Extra per-module arguments for ``update_layer`` (e.g. the rank of a baked module); none by default."""
        return {}

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        options = self.layer_options(peft_config, current_key)
        if isinstance(target, self.layer_cls):
            target.update_layer(adapter_name, peft_config, **options)
            return
        new_module = self.layer_cls(target, adapter_name, peft_config, **options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # PEFT collects the tensors of every tuner layer in the model; a history bake stacked below this adapter is
        # another tuner's state and must not be saved with it
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {key: value for key, value in entries.items() if f".{cls.prefix}" in key}

    def modulated_layers(self) -> list[ModulatedLayer]:
        """This tuner's layers (a stacked model also holds the layers of the tuner below)."""
        return [module for module in self.model.modules() if isinstance(module, self.tuner_layer_cls)]


def get_coefficient(model: nn.Module, adapter_name: Optional[str] = None) -> float:
    """The runtime coefficient of ``adapter_name`` (default: the single active adapter)."""
    tuner = tuner_of(model, ModulatedTuner, "modulated LoRA/PiSSA")
    name = resolve_adapter(tuner, adapter_name)
    for layer in tuner.modulated_layers():
        if name in layer.coefficients:
            return layer.coefficients[name]
    raise ValueError(f"adapter {name!r} is not a modulated LoRA/PiSSA adapter of this model")


def set_coefficient(model: nn.Module, c: float, adapter_name: Optional[str] = None) -> None:
    """Set the runtime coefficient ``c`` of ``adapter_name`` (default: every active adapter). Not saved."""
    tuner = tuner_of(model, ModulatedTuner, "modulated LoRA/PiSSA")
    names = [adapter_name] if adapter_name is not None else list(tuner.active_adapters)
    unknown = [n for n in names if n not in tuner.peft_config]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {sorted(tuner.peft_config)}")
    for layer in tuner.modulated_layers():
        for name in names:
            if name in layer.coefficients:
                layer.set_coefficient(name, c)


@contextmanager
def coefficient(model: nn.Module, c: float, adapter_name: Optional[str] = None):
    """``with coefficient(model, c):`` runs with ``c`` and restores every previous value on exit (also on errors)."""
    tuner = tuner_of(model, ModulatedTuner, "modulated LoRA/PiSSA")
    saved = [(layer, dict(layer.coefficients)) for layer in tuner.modulated_layers()]
    set_coefficient(model, c, adapter_name)
    try:
        yield
    finally:
        for layer, values in saved:
            layer.coefficients.update(values)
