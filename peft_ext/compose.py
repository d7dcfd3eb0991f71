"""Compose log-gate controllers: ``s = clip(Σ wᵢ sᵢ, ±budget)`` with mask = union of the inputs' masks.

:func:`plan_composition` measures what composing would do (clipping, sign conflicts, Jaccard overlap and cosine of the
weighted log-gates) without writing anything; :func:`compose_gates` checks the plan and then writes a new adapter.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Optional

import torch

from .tuners.common import tuner_of
from .tuners.loggate import LogGateModel

# fraction of the union of gates that may be clipped before the plan counts it as a blocking problem
MAX_CLIPPED_FRACTION = 0.5


def _stacked_gates(tuner, adapters: Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Block names targeted by any adapter, log-gates ``[adapter, block, channel]`` (fp64) and masks (bool)."""
    layers = [(name, layer) for name, layer in tuner.gate_layers() if any(a in layer.loggate_raw for a in adapters)]
    hidden = layers[0][1].hidden_size
    gates = torch.zeros(len(adapters), len(layers), hidden, dtype=torch.float64)
    masks = torch.zeros(len(adapters), len(layers), hidden, dtype=torch.bool)
    with torch.no_grad():
        for (i, adapter), (j, (_, layer)) in itertools.product(enumerate(adapters), enumerate(layers)):
            if adapter in layer.loggate_raw:
                gates[i, j] = layer.log_gate(adapter).double().cpu()
                masks[i, j] = layer.loggate_mask[adapter].cpu()
    return [name for name, _ in layers], gates, masks


def plan_composition(model, adapters: Sequence[str], weights: Sequence[float], budget: Optional[float] = None) -> dict:
    """What composing ``adapters`` with ``weights`` under ``budget`` would do; nothing is written.

    ``budget`` defaults to the largest ``max_log_gate`` of the inputs. The plan lists ``blocking`` problems
    (non-finite gates, more than half of the union clipped) and ``warnings`` (any clipping, sign conflicts).
    """
    tuner = tuner_of(model, LogGateModel, "log-gate")
    adapters, weights = list(adapters), [float(w) for w in weights]
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"unknown adapters {missing}; the model has {sorted(tuner.peft_config)}")
    if len(adapters) < 1 or len(adapters) != len(weights) or len(set(adapters)) != len(adapters):
        raise ValueError(f"need distinct adapters and one weight each, got adapters={adapters} weights={weights}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    bounds = [tuner.peft_config[a].max_log_gate for a in adapters]
    budget = max(bounds) if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget}: must be a finite positive log-gate bound")

    blocks, gates, masks = _stacked_gates(tuner, adapters)
    contributions = gates * torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    union = masks.any(dim=0)
    combined = contributions.sum(dim=0)
    clipped = (combined.abs() > budget) & union
    positive = (contributions > 0).any(dim=0)
    negative = (contributions < 0).any(dim=0)
    union_count = int(union.sum())

    pairs = []
    for i, j in itertools.combinations(range(len(adapters)), 2):
        intersection = int((masks[i] & masks[j]).sum())
        either = int((masks[i] | masks[j]).sum())
        norm = float(contributions[i].norm() * contributions[j].norm())
        pairs.append({
            "adapters": [adapters[i], adapters[j]],
            "jaccard": intersection / either if either else 0.0,
            "cosine": float((contributions[i] * contributions[j]).sum()) / norm if norm > 0 else 0.0,
        })

    blocking, warnings = [], []
    finite = bool(torch.isfinite(gates).all())
    clipped_fraction = int(clipped.sum()) / union_count if union_count else 0.0
    if not finite:
        blocking.append("non-finite log-gates in the inputs")
    if clipped_fraction > MAX_CLIPPED_FRACTION:
        blocking.append(f"{clipped_fraction:.0%} of the gates would be clipped to the budget {budget}")
    elif clipped_fraction > 0:
        warnings.append(f"{clipped_fraction:.1%} of the gates are clipped to the budget {budget}")
    sign_conflicts = int((positive & negative).sum())
    if sign_conflicts:
        warnings.append(f"{sign_conflicts} gates receive contributions of opposite sign")
    return {
        "adapters": adapters,
        "weights": weights,
        "budget": budget,
        "blocks": blocks,
        "gates_per_adapter": {a: int(masks[i].sum()) for i, a in enumerate(adapters)},
        "union_gates": union_count,
        "clipped_fraction": clipped_fraction,
        "sign_conflicts": sign_conflicts,
        "max_abs_combined": float(combined.abs().max()) if finite else float("nan"),
        "pairs": pairs,
        "blocking": blocking,
        "warnings": warnings,
    }


def compose_gates(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    budget: Optional[float] = None,
    adapter_name: str = "composed",
    force: bool = False,
) -> dict:
    """Add adapter ``adapter_name`` with ``s = clip(Σ wᵢ sᵢ, ±budget)`` and mask = union; return the plan.

    The new adapter has ``max_log_gate = budget`` and targets the union of the inputs' blocks; it is not activated
    (``model.set_adapter(adapter_name)``). Refuses when the plan has blocking problems unless ``force=True``. The plan
    gains ``max_reconstruction_error``: the largest ``|s_written - s_target|`` after the fp32 round trip through tanh.
    """
    tuner = tuner_of(model, LogGateModel, "log-gate")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another adapter_name")
    plan = plan_composition(model, adapters, weights, budget)
    if plan["blocking"] and not force:
        raise ValueError(f"composition refused: {'; '.join(plan['blocking'])} (pass force=True to compose anyway)")
    budget = plan["budget"]
    _, gates, masks = _stacked_gates(tuner, plan["adapters"])
    weights = torch.tensor(plan["weights"], dtype=torch.float64).view(-1, 1, 1)
    target = (gates * weights).sum(dim=0).clamp(-budget, budget)
    union = masks.any(dim=0)
    # raw = atanh(s / budget); |s| = budget maps to the largest fp32 raw whose tanh is still below 1
    raw = torch.atanh((target / budget).clamp(-1 + 2**-24, 1 - 2**-24))

    sparse = any(tuner.peft_config[a].num_gates is not None for a in plan["adapters"])
    tuner.peft_config[adapter_name] = dataclasses.replace(
        tuner.peft_config[plan["adapters"][0]],
        num_gates=int(union.sum()) if sparse else None,
        max_log_gate=budget,
        layers="all",
        target_modules=list(plan["blocks"]),
        init="zero",
        inference_mode=True,
    )
    tuner.inject_adapter(tuner.model, adapter_name)
    layers = dict(tuner.gate_layers())
    error = 0.0
    with torch.no_grad():
        for j, block in enumerate(plan["blocks"]):
            layer = layers[block]
            layer.loggate_raw[adapter_name].copy_(raw[j])
            layer.loggate_mask[adapter_name].copy_(union[j])
            layer.loggate_raw[adapter_name].requires_grad_(False)
            written = layer.log_gate(adapter_name).double().cpu()
            error = max(error, float((written - target[j] * union[j]).abs().max()))
    tuner.set_selected(adapter_name)
    plan["adapter_name"] = adapter_name
    plan["max_reconstruction_error"] = error
    return plan
