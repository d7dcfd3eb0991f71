from __future__ import annotations

from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..common import ADAPTER_DTYPE, module_device, svd
from ..modulated import ModulatedLayer, ModulatedLinear


def direction_scores(selection: str, singular_values: torch.Tensor, stats: Optional[dict]) -> torch.Tensor:
    """Score of every singular direction for ``selection`` (see :class:`ModulatedPissaConfig`)."""
    if selection == "s_only":
        return singular_values
    if stats is None:
        raise RuntimeError(f"selection={selection!r} needs activation statistics: call peft_ext.calibrate first")
    mean, second = stats["chosen"]
    if selection == "act_only":
        return second.sqrt()
    if selection == "wanda":
        return singular_values * second.sqrt()
    if "rejected" not in stats:
        raise ValueError("selection='cho_rej_min_std' needs rejected batches: calibrate(model, chosen, rejected)")
    rejected_mean, rejected_second = stats["rejected"]
    std = (second - mean**2).clamp_min(0).sqrt()
    rejected_std = (rejected_second - rejected_mean**2).clamp_min(0).sqrt()
    return (mean - rejected_mean).abs() / torch.minimum(std, rejected_std).clamp_min(1e-12)


class MPissaLayer(ModulatedLayer):
    """Per adapter: saved buffers ``U_r, S_r, V_rᵀ``, trainable ``Δs`` (and optional ``Δs_hack``), coefficient ``c``.

    The SVD is deferred: it runs at the first forward (``s_only``) or in :func:`peft_ext.calibrate`; loading an adapter
    fills the buffers from the file and skips it.
    """

    adapter_layer_names = ("mpissa_delta_s", "mpissa_delta_s_hack")
    other_param_names = ("mpissa_u", "mpissa_s", "mpissa_vt", "mpissa_coefficient", "mpissa_pending")
    coefficient_attr = "mpissa_coefficient"

    def _init_adapter_containers(self) -> None:
        self.mpissa_delta_s = nn.ParameterDict({})
        self.mpissa_delta_s_hack = nn.ParameterDict({})
        self.mpissa_u = BufferDict({}, persistent=True)
        self.mpissa_s = BufferDict({}, persistent=True)
        self.mpissa_vt = BufferDict({}, persistent=True)
        self.mpissa_coefficient: dict[str, float] = {}
        self.mpissa_pending: dict[str, dict] = {}  # adapters whose directions are not chosen yet

    def update_layer(self, adapter_name: str, config) -> None:
        full = min(self.in_features, self.out_features)
        r = full if config.r == "full" else config.r
        if r > full:
            raise ValueError(f"r={r} exceeds min(d_out, d_in)={full} of a {self.out_features}x{self.in_features} layer")
        device = module_device(self.base_layer)
        zeros = lambda *shape: torch.zeros(*shape, dtype=ADAPTER_DTYPE, device=device)  # noqa: E731
        self.mpissa_u[adapter_name] = zeros(self.out_features, r)
        self.mpissa_s[adapter_name] = zeros(r)
        self.mpissa_vt[adapter_name] = zeros(r, self.in_features)
        self.mpissa_delta_s[adapter_name] = nn.Parameter(torch.full((r,), float(config.init_delta_s), device=device))
        if config.quarantine:
            self.mpissa_delta_s_hack[adapter_name] = nn.Parameter(zeros(r))
        self.mpissa_coefficient[adapter_name] = float(config.coefficient)
        self.mpissa_pending[adapter_name] = {"selection": config.selection, "cache_dir": config.svd_cache_dir}
        self.set_adapter(self.active_adapters)

    def full_svd(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SVD of the (dequantised) base weight in fp32."""
        return svd(self.get_base_weight(), self.mpissa_pending[adapter_name]["cache_dir"])

    def choose_directions(self, adapter_name: str, stats: Optional[dict] = None, decomposition=None) -> dict:
        """Fill ``U_r, S_r, V_rᵀ`` with the ``r`` best-scoring directions; return where they sit in the spectrum."""
        pending = self.mpissa_pending[adapter_name]
        u, s, vh = decomposition if decomposition is not None else self.full_svd(adapter_name)
        r = self.mpissa_s[adapter_name].numel()
        scores = direction_scores(pending["selection"], s, stats)
        chosen = scores.topk(r).indices.sort().values
        with torch.no_grad():
            self.mpissa_u[adapter_name].copy_(u[:, chosen])
            self.mpissa_s[adapter_name].copy_(s[chosen])
            self.mpissa_vt[adapter_name].copy_(vh[chosen])
        del self.mpissa_pending[adapter_name]
        ranks = chosen.float()
        return {"mean_rank": float(ranks.mean()), "max_rank": int(chosen.max()),
                "tail_fraction": float((chosen >= r).float().mean()), "of": int(s.numel())}

    def _ready(self, adapter_name: str) -> None:
        if adapter_name in self.mpissa_pending:
            if self.mpissa_pending[adapter_name]["selection"] != "s_only":
                raise RuntimeError(
                    f"adapter {adapter_name!r} selects directions by "
                    f"{self.mpissa_pending[adapter_name]['selection']!r}: call peft_ext.calibrate(model, batches) first"
                )
            self.choose_directions(adapter_name)

    def delta_s(self, adapter_name: str) -> torch.Tensor:
        delta_s = self.mpissa_delta_s[adapter_name].to(ADAPTER_DTYPE)
        if adapter_name in self.mpissa_delta_s_hack:
            delta_s = delta_s + self.mpissa_delta_s_hack[adapter_name].to(ADAPTER_DTYPE)
        return delta_s

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        self._ready(adapter_name)
        return ((x @ self.mpissa_vt[adapter_name].T) * self.delta_s(adapter_name)) @ self.mpissa_u[adapter_name].T

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        self._ready(adapter_name)
        with torch.no_grad():
            return (self.mpissa_u[adapter_name] * self.delta_s(adapter_name)) @ self.mpissa_vt[adapter_name]

    def _loaded_from_state_dict(self, state_dict, prefix: str) -> None:
        for name in list(self.mpissa_pending):
            if f"{prefix}mpissa_vt.{name}" in state_dict:
                del self.mpissa_pending[name]  # directions came with the file: no SVD


class MPissaLinear(ModulatedLinear, MPissaLayer):
    """A linear layer (``nn.Linear``, bnb ``Linear4bit`` or ``Linear8bitLt``) with modulated PiSSA adapters."""
