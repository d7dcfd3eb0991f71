"""Calibration and deployment helpers of modulated PiSSA adapters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import to_device
from .tuners.common import ADAPTER_DTYPE, all_reduce_sum, module_device, resolve_adapter, tuner_of
from .tuners.modulated import coefficient
from .tuners.mpissa import MPissaLayer, MPissaModel


@torch.no_grad()
def _input_moments(tuner, layers: dict, decompositions: dict, batches, progress: bool, desc: str) -> dict:
    """Per layer: (E[p], E[p²]) of the projections ``p = V x`` of the layer inputs on non-padding tokens (of every rank's
    batches in a data-parallel job: the sums are all-reduced)."""
    # per layer: [token count, Σp, Σp²] in fp64, one flat vector so that a data-parallel job reduces it in one call
    sums = {name: torch.zeros(1 + 2 * decompositions[name][2].shape[0], dtype=torch.float64) for name in layers}
    current = {}

    def hook(name):
        vh = decompositions[name][2]

        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(ADAPTER_DTYPE)
            mask = current.get("attention_mask")
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.reshape(-1).bool()]
            p = (x @ vh.T).double()
            sums[name] += torch.cat([torch.tensor([p.shape[0]], dtype=torch.float64, device=p.device), p.sum(0),
                                     (p * p).sum(0)]).cpu()

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    device = module_device(tuner.model)
    try:
        for batch in tqdm(batches, disable=not progress, desc=desc):
            batch = to_device(batch, device)
            current["attention_mask"] = batch.get("attention_mask")
            tuner.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
    sums = {name: all_reduce_sum(vector) for name, vector in sums.items()}
    if any(vector[0] == 0 for vector in sums.values()):
        raise ValueError(f"calibration saw no tokens ({desc}); pass non-empty batches")
    moments = {}
    for name, vector in sums.items():
        count, (total, squares) = vector[0], vector[1:].chunk(2)
        device = decompositions[name][2].device
        moments[name] = ((total / count).to(ADAPTER_DTYPE).to(device), (squares / count).to(ADAPTER_DTYPE).to(device))
    return moments


def calibrate(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    rejected_batches: Optional[Iterable[Mapping[str, torch.Tensor]]] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Choose the directions of a PiSSA adapter from streaming input moments and return a spectrum summary.

    For every target: SVD of the base weight (cached when ``svd_cache_dir`` is set), then the mean and second moment
    of ``V x`` over the non-padding tokens of ``batches`` (and of ``rejected_batches`` for ``cho_rej_min_std``),
    accumulated batch by batch; no activations are stored. The forward passes run with every adapter at ``c = 0``.
    The summary gives, per target and on average, the mean rank of the chosen directions (0 = largest σ), the largest
    rank, and ``tail_fraction``: the share of chosen directions outside the top ``r`` of the spectrum.
    """
    tuner = tuner_of(model, MPissaModel, "modulated PiSSA")
    name = resolve_adapter(tuner, adapter_name)
    layers = {key: m for key, m in tuner.model.named_modules() if isinstance(m, MPissaLayer) and name in m.mpissa_pending}
    if not layers:
        raise ValueError(f"adapter {name!r} has no directions left to choose (already calibrated, used or loaded)")
    selection = tuner.peft_config[name].selection
    if selection == "cho_rej_min_std" and rejected_batches is None:
        raise ValueError("selection='cho_rej_min_std' needs rejected_batches")
    decompositions = {key: layer.full_svd(name) for key, layer in layers.items()}
    stats = {key: {} for key in layers}
    was_training = tuner.model.training
    tuner.model.eval()
    try:
        with coefficient(model, 0.0):
            sets = [("chosen", batches)] + ([("rejected", rejected_batches)] if rejected_batches is not None else [])
            for label, data in sets:
                for key, moments in _input_moments(tuner, layers, decompositions, data, progress, label).items():
                    stats[key][label] = moments
    finally:
        tuner.model.train(was_training)
    targets = {key: layer.choose_directions(name, stats[key], decompositions[key]) for key, layer in layers.items()}
    return {
        "adapter": name,
        "selection": selection,
        "targets": targets,
        "mean_rank": sum(t["mean_rank"] for t in targets.values()) / len(targets),
        "tail_fraction": sum(t["tail_fraction"] for t in targets.values()) / len(targets),
    }


def drop_quarantine(model, adapter_name: Optional[str] = None) -> int:
    """Remove the quarantine knob ``Δs_hack`` of ``adapter_name`` for deployment; returns how many layers had one."""
    tuner = tuner_of(model, MPissaModel, "modulated PiSSA")
    name = resolve_adapter(tuner, adapter_name)
    dropped = 0
    for layer in tuner.modulated_layers():
        if name in layer.mpissa_delta_s_hack:
            del layer.mpissa_delta_s_hack[name]
            dropped += 1
    tuner.peft_config[name].quarantine = False
    return dropped
