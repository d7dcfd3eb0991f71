"""Choose which log-gates a sparse controller may train.

At ``s = 0`` the gradient of the loss with respect to a gate is ``dL/ds = Σ_t g_t ⊙ h_t`` (``g_t`` the gradient at the
block output, ``h_t`` the output itself); summed over ``score_batches`` batches (and over the ranks of a data-parallel
job) it is the first-order loss change per unit of log-gate, so the gates with the largest ``|dL/ds|`` are kept.
Because ``ds/draw = bound`` at ``raw = 0``, the gradient with respect to ``raw`` is used directly and divided by the
bound.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import to_device
from .tuners.common import all_reduce_sum, module_device, resolve_adapter, tuner_of
from .tuners.loggate import LogGateModel
from .tuners.loggate.config import SELECTION_STRATEGIES


def _gradient_scores(tuner, layers, adapter_name: str, batches, score_batches: int, progress: bool) -> tuple[torch.Tensor, int]:
    """``Σ dL/ds`` over up to ``score_batches`` batches, shape ``[num_blocks, hidden]`` (fp32, CPU)."""
    raws = [layer.loggate_raw[adapter_name] for _, layer in layers]
    requires_grad = [raw.requires_grad for raw in raws]
    was_training = tuner.model.training
    device = module_device(tuner.model)
    total = torch.zeros(len(layers), layers[0][1].hidden_size, dtype=torch.float32)
    used = 0
    try:
        for raw in raws:
            raw.requires_grad_(True)
        tuner.model.eval()
        for batch in tqdm(itertools.islice(batches, score_batches), total=score_batches, disable=not progress,
                          desc="scoring gates"):
            if "labels" not in batch:
                raise ValueError("gate selection needs batches with `labels` (completion tokens; -100 elsewhere)")
            loss = tuner(**to_device(batch, device)).loss
            grads = torch.autograd.grad(loss, raws)
            total += torch.stack([g.detach().float().cpu() for g in grads])
            used += 1
    finally:
        for raw, flag in zip(raws, requires_grad):
            raw.requires_grad_(flag)
        tuner.model.train(was_training)
    total = all_reduce_sum(total)  # data-parallel: every rank scores its shard, all select from the sum
    used = int(all_reduce_sum(torch.tensor([used], dtype=torch.float64)).item())
    if used == 0:
        raise ValueError("gate selection got no batches to score")
    bounds = torch.tensor([layer.loggate_bound[adapter_name] for _, layer in layers]).unsqueeze(1)
    return total / bounds, used


def _top_k_mask(scores: torch.Tensor, num_gates: int, per_layer: bool) -> torch.Tensor:
    """Boolean mask of the ``num_gates`` largest ``|scores|``: globally, or with an equal quota per block."""
    magnitude = scores.abs()
    mask = torch.zeros_like(magnitude, dtype=torch.bool)
    if per_layer:
        num_blocks = magnitude.shape[0]
        quotas = [num_gates // num_blocks + (i < num_gates % num_blocks) for i in range(num_blocks)]
        for row, quota in enumerate(quotas):
            mask[row, magnitude[row].topk(quota).indices] = True
    else:
        mask.view(-1)[magnitude.flatten().topk(num_gates).indices] = True
    return mask


def select_gates(
    model,
    batches: Optional[Iterable[Mapping[str, torch.Tensor]]] = None,
    num_gates: Optional[int] = None,
    score_batches: Optional[int] = None,
    strategy: Optional[str] = None,
    adapter_name: Optional[str] = None,
    seed: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Set the persistent gate mask of ``adapter_name`` (default: the active adapter) and return a report.

    ``strategy``: ``"gradient"`` (global top-k of ``|Σ dL/ds|``), ``"per_layer"`` (equal quota per block) or
    ``"random"`` (uniform, seeded; needs no batches). Defaults come from the adapter's :class:`GateConfig`; the
    adapter's ``num_gates`` is updated so the saved config says what was selected. The adapter must still be at
    ``s = 0`` (selection scores the identity point); its ``raw`` values are re-initialised per ``config.init``.
    """
    tuner = tuner_of(model, LogGateModel, "log-gate")
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    num_gates = config.num_gates if num_gates is None else num_gates
    strategy = config.selection if strategy is None else strategy
    score_batches = config.score_batches if score_batches is None else score_batches
    seed = config.selection_seed if seed is None else seed
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {SELECTION_STRATEGIES}")
    if num_gates is None:
        raise ValueError(f"adapter {adapter_name!r} is dense (num_gates=None): pass num_gates=... to make it sparse")
    if adapter_name not in tuner.active_adapters:
        raise ValueError(f"adapter {adapter_name!r} is not active; model.set_adapter({adapter_name!r}) first")
    layers = [(name, layer) for name, layer in tuner.gate_layers() if adapter_name in layer.loggate_raw]
    capacity = sum(layer.hidden_size for _, layer in layers)
    if not 1 <= num_gates <= capacity:
        raise ValueError(f"num_gates={num_gates}: must be in [1, {capacity}] ({len(layers)} blocks x hidden size)")
    with torch.no_grad():
        if any(bool(layer.log_gate(adapter_name).any()) for _, layer in layers):
            raise ValueError(
                f"adapter {adapter_name!r} already has non-zero gates; selection scores the identity point and would "
                "discard them. Select on a fresh adapter (model.add_adapter(name, GateConfig(...)))."
            )
        saved_masks = [layer.loggate_mask[adapter_name].clone() for _, layer in layers]
        for _, layer in layers:
            layer.loggate_raw[adapter_name].zero_()
            layer.loggate_mask[adapter_name].fill_(True)

    start = time.perf_counter()
    scores, used = None, 0
    try:
        if strategy == "random":
            generator = torch.Generator().manual_seed(seed)
            mask = _top_k_mask(torch.rand(len(layers), layers[0][1].hidden_size, generator=generator), num_gates, False)
        else:
            if batches is None:
                raise ValueError(f"strategy={strategy!r} needs batches of training data")
            scores, used = _gradient_scores(tuner, layers, adapter_name, batches, score_batches, progress)
            mask = _top_k_mask(scores, num_gates, per_layer=strategy == "per_layer")
    except BaseException:
        with torch.no_grad():
            for (_, layer), saved in zip(layers, saved_masks):
                layer.loggate_mask[adapter_name].copy_(saved)
        tuner.set_selected(adapter_name, False)
        raise

    with torch.no_grad():
        for row, (_, layer) in enumerate(layers):
            layer.loggate_mask[adapter_name].copy_(mask[row].to(layer.loggate_mask[adapter_name].device))
            if config.init == "random":
                layer.loggate_raw[adapter_name].uniform_(-1.0, 1.0)
    config.num_gates = num_gates
    tuner.set_selected(adapter_name)
    report = {
        "adapter": adapter_name,
        "strategy": strategy,
        "num_gates": num_gates,
        "capacity": capacity,
        "score_batches": used,
        "seconds": round(time.perf_counter() - start, 4),
        "gates_per_block": {name: int(mask[row].sum()) for row, (name, _) in enumerate(layers)},
    }
    if scores is not None:
        magnitude = scores.abs()
        report["score_captured_fraction"] = float(magnitude[mask].sum() / magnitude.sum().clamp_min(1e-30))
    return report
