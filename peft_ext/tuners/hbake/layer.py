from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict

from ..common import ADAPTER_DTYPE, module_device
from ..modulated import ModulatedLayer, ModulatedLinear


class HistoryBakeLayer(ModulatedLayer):
    """Per adapter: frozen buffers ``hbake_A`` (``rank x d_in``) and ``hbake_B`` (``d_out x rank``); ``delta(x) = B(Ax)``.

    The coefficient starts at 1 (the kept coefficients are folded into ``B``); ``peft_ext.set_coefficient`` scales the
    whole history and 0 switches it off exactly.
    """

    adapter_layer_names = ()  # nothing trains
    other_param_names = ("hbake_A", "hbake_B", "hbake_coefficient")
    coefficient_attr = "hbake_coefficient"

    def _init_adapter_containers(self) -> None:
        self.hbake_A = BufferDict({}, persistent=True)
        self.hbake_B = BufferDict({}, persistent=True)
        self.hbake_coefficient: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config, rank: int) -> None:
        device = module_device(self.base_layer)
        self.hbake_A[adapter_name] = torch.zeros(rank, self.in_features, dtype=ADAPTER_DTYPE, device=device)
        self.hbake_B[adapter_name] = torch.zeros(self.out_features, rank, dtype=ADAPTER_DTYPE, device=device)
        self.hbake_coefficient[adapter_name] = 1.0
        self.set_adapter(self.active_adapters)

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.hbake_A[adapter_name].T) @ self.hbake_B[adapter_name].T

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.hbake_B[adapter_name] @ self.hbake_A[adapter_name]


class HistoryBakeLinear(ModulatedLinear, HistoryBakeLayer):
    """A linear layer (``nn.Linear``, bnb ``Linear4bit`` or ``Linear8bitLt``) with baked history."""
