from __future__ import annotations

import math

import torch
from torch import nn

from ..common import ADAPTER_DTYPE, module_device
from ..modulated import ModulatedLayer, ModulatedLinear


class MLoraLayer(ModulatedLayer):
    """Per adapter: ``mlora_A`` (``r x d_in``), ``mlora_B`` (``d_out x r``), scale ``alpha/r`` and coefficient ``c``."""

    adapter_layer_names = ("mlora_A", "mlora_B")
    other_param_names = ("mlora_scaling", "mlora_coefficient")
    coefficient_attr = "mlora_coefficient"

    def _init_adapter_containers(self) -> None:
        self.mlora_A = nn.ParameterDict({})
        self.mlora_B = nn.ParameterDict({})
        self.mlora_scaling: dict[str, float] = {}
        self.mlora_coefficient: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config) -> None:
        device = module_device(self.base_layer)
        a = torch.empty(config.r, self.in_features, dtype=ADAPTER_DTYPE, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRA's A init
        b = torch.zeros(self.out_features, config.r, dtype=ADAPTER_DTYPE, device=device)
        if config.init_b == "random":
            nn.init.normal_(b, std=0.02)
        self.mlora_A[adapter_name] = nn.Parameter(a)
        self.mlora_B[adapter_name] = nn.Parameter(b)
        self.mlora_scaling[adapter_name] = config.alpha / config.r
        self.mlora_coefficient[adapter_name] = float(config.coefficient)
        self.set_adapter(self.active_adapters)

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.mlora_A[adapter_name].to(ADAPTER_DTYPE)
        b = self.mlora_B[adapter_name].to(ADAPTER_DTYPE)
        return (x @ a.T) @ (b.T * self.mlora_scaling[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return (self.mlora_B[adapter_name] @ self.mlora_A[adapter_name]).to(ADAPTER_DTYPE) * self.mlora_scaling[
                adapter_name
            ]


class MLoraLinear(ModulatedLinear, MLoraLayer):
    """A linear layer (``nn.Linear``, bnb ``Linear4bit`` or ``Linear8bitLt``) with modulated LoRA adapters."""
