"""Compose adapters: log-gate controllers by clipped sums, low-rank adapters by weighted sums of their deltas.

Gates: ``s = clip(Σ wᵢ sᵢ, ±budget)`` with mask = union of the inputs' masks. :func:`plan_composition` measures what
composing would do (clipping, sign conflicts, Jaccard overlap and cosine of the weighted log-gates) without writing
anything; :func:`compose_gates` checks the plan and then writes a new adapter.

Low-rank adapters (modulated LoRA/PiSSA, PEFT LoRA, bakes): the weighted sum ``Σ wᵢ ΔWᵢ`` is exactly a history bake
with the weights as kept coefficients (:func:`peft_ext.bake`). :func:`plan_lowrank` measures, per module shared by
two adapters, the principal angles between their column spaces (of ``B``) and row spaces (of ``A``) and the cosine
between the weighted deltas ``<wᵢΔWᵢ, wⱼΔWⱼ>_F / (‖wᵢΔWᵢ‖ ‖wⱼΔWⱼ‖)``: near 0 the adapters act on separate directions
and add without interference; near +1 they reinforce, near -1 they cancel.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Optional

import torch

from .tuners.common import check_adapter_name, tuner_of
from .tuners.loggate import LogGateModel
from .tuners.loggate.layer import log_gates

# fraction of the union of gates that may be clipped before the plan counts it as a blocking problem
MAX_CLIPPED_FRACTION = 0.5
# |cosine| between two weighted deltas above which the plan warns that they interfere on that module
INTERFERENCE_COSINE = 0.5


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
    adapters = list(adapters)
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"unknown adapters {missing}; the model has {sorted(tuner.peft_config)}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"need distinct adapters, got {adapters}")
    blocks, gates, masks = _stacked_gates(tuner, adapters)
    bounds = [tuner.peft_config[a].max_log_gate for a in adapters]
    return plan_gates(adapters, weights, bounds, blocks, gates, masks, budget)


def plan_gates(adapters: Sequence[str], weights: Sequence[float], bounds: Sequence[float], blocks: list[str],
               gates: torch.Tensor, masks: torch.Tensor, budget: Optional[float] = None) -> dict:
    """The plan of :func:`plan_composition` from log-gates ``[adapter, block, channel]`` and masks directly."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(adapters) < 1 or len(adapters) != len(weights):
        raise ValueError(f"need one weight per adapter, got adapters={adapters} weights={weights}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    budget = max(bounds) if budget is None else float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget}: must be a finite positive log-gate bound")
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
    check_adapter_name(adapter_name)
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


def _module_order(path: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


def saved_gate_values(saved, dtype: torch.dtype = torch.float64) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Block names, log-gates ``s = bound·tanh(raw)·mask`` (``[blocks, hidden]``, fp64 by default; fp32 reproduces
    the layer's forward exactly) and masks of a saved controller (a :class:`~peft_ext.loading.SavedAdapter`)."""
    blocks = sorted({key.removeprefix("base_model.model.").removesuffix(".loggate_raw")
                     for key in saved.tensors if key.endswith(".loggate_raw")}, key=_module_order)
    if not blocks:
        raise ValueError(f"{saved.source}: no loggate_raw tensors, so this is not a saved log-gate controller")
    bound = float(saved.config.get("max_log_gate", 0.05))
    raw = torch.stack([saved.tensors[f"base_model.model.{b}.loggate_raw"].to(dtype) for b in blocks])
    masks = torch.stack([saved.tensors.get(f"base_model.model.{b}.loggate_mask", torch.ones(raw.shape[1])).bool()
                         for b in blocks])
    return blocks, log_gates(raw, masks, bound), masks


def plan_saved_gates(sources: Sequence[str], weights: Sequence[float], budget: Optional[float] = None) -> dict:
    """:func:`plan_composition` of saved controllers, read from their folders (no model needed)."""
    from .loading import read_adapter_files

    saved = [read_adapter_files(source) for source in sources]
    values = [saved_gate_values(adapter) for adapter in saved]
    blocks = sorted({b for names, _, _ in values for b in names}, key=_module_order)
    widths = {g.shape[1] for _, g, _ in values}
    if len(widths) > 1:
        raise ValueError(f"the controllers gate hidden states of different widths {sorted(widths)}: other base models")
    gates = torch.zeros(len(saved), len(blocks), widths.pop(), dtype=torch.float64)
    masks = torch.zeros(gates.shape, dtype=torch.bool)
    for i, (names, adapter_gates, adapter_masks) in enumerate(values):
        rows = [blocks.index(name) for name in names]
        gates[i, rows], masks[i, rows] = adapter_gates, adapter_masks
    bounds = [float(adapter.config.get("max_log_gate", 0.05)) for adapter in saved]
    return plan_gates([str(s) for s in sources], weights, bounds, blocks, gates, masks, budget)


def _orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``matrix`` (fp64), numerically zero directions dropped."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, s > s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps]


def _subspace_overlap(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Cosines of the principal angles between two subspaces (orthonormal bases): the largest and mean cos²."""
    if first.shape[1] == 0 or second.shape[1] == 0:
        return {"max_cosine": 0.0, "mean_cosine_squared": 0.0}
    cosines = torch.linalg.svdvals(first.T @ second).clamp(0.0, 1.0)
    return {"max_cosine": float(cosines.max()),
            "mean_cosine_squared": float((cosines**2).sum()) / min(first.shape[1], second.shape[1])}


def delta_inner(a1, b1, a2, b2) -> float:
    """``<B1 A1, B2 A2>_F = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)``, without forming the dense deltas."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def plan_lowrank(rounds: Sequence[tuple[str, float]]) -> dict:
    """What ``Σ wᵢ ΔWᵢ`` of saved low-rank adapters would do, per module and pair; nothing is written.

    ``rounds = [(adapter folder or Hub id, weight), ...]``. Modules whose shapes differ between adapters are blocking
    (the adapters belong to different models); pairs with ``|cosine| > INTERFERENCE_COSINE`` on a module are warnings.
    """
    from .bake import read_round

    if len(rounds) < 1:
        raise ValueError("pass at least one (adapter, weight)")
    kept = [read_round(source, weight) for source, weight in rounds]
    blocking, warnings, pairs = [], [], []
    for i, j in itertools.combinations(range(len(kept)), 2):
        shared = sorted(set(kept[i].factors) & set(kept[j].factors))
        modules = {}
        for path in shared:
            (a1, b1), (a2, b2) = kept[i].factors[path], kept[j].factors[path]
            if (b1.shape[0], a1.shape[1]) != (b2.shape[0], a2.shape[1]):
                blocking.append(f"{path}: {kept[i].source} is {b1.shape[0]}x{a1.shape[1]}, "
                                f"{kept[j].source} is {b2.shape[0]}x{a2.shape[1]} (different base models)")
                continue
            norm = math.sqrt(max(delta_inner(a1, b1, a1, b1), 0.0) * max(delta_inner(a2, b2, a2, b2), 0.0))
            cosine = delta_inner(a1, b1, a2, b2) / norm if norm > 0 else 0.0
            modules[path] = {
                "columns": _subspace_overlap(_orthonormal_basis(b1), _orthonormal_basis(b2)),
                "rows": _subspace_overlap(_orthonormal_basis(a1.T), _orthonormal_basis(a2.T)),
                "delta_cosine": cosine,
            }
        interfering = sorted(path for path, m in modules.items() if abs(m["delta_cosine"]) > INTERFERENCE_COSINE)
        if interfering:
            warnings.append(f"{kept[i].source} and {kept[j].source} interfere (|cosine| > {INTERFERENCE_COSINE}) on "
                            f"{len(interfering)} modules, e.g. {interfering[0]}")
        cosines = [m["delta_cosine"] for m in modules.values()]
        pairs.append({
            "adapters": [kept[i].source, kept[j].source],
            "shared_modules": len(shared),
            "only_first": len(set(kept[i].factors) - set(kept[j].factors)),
            "only_second": len(set(kept[j].factors) - set(kept[i].factors)),
            "mean_abs_delta_cosine": sum(map(abs, cosines)) / len(cosines) if cosines else 0.0,
            "mean_column_cosine_squared": _mean(m["columns"]["mean_cosine_squared"] for m in modules.values()),
            "mean_row_cosine_squared": _mean(m["rows"]["mean_cosine_squared"] for m in modules.values()),
            "interfering_modules": interfering,
            "modules": modules,
        })
    return {
        "adapters": [k.source for k in kept],
        "weights": [k.coefficient for k in kept],
        "types": [k.peft_type for k in kept],
        "modules": len({path for k in kept for path in k.factors}),
        "pairs": pairs,
        "blocking": blocking,
        "warnings": warnings,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
