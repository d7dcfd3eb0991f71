"""Fit the trainable adapter parameters of a model on completion-only teacher-forced NLL.

:func:`fit` is the training loop; :func:`fit_adapter` is the whole workflow behind ``peft-ext fit``: add the adapter,
select gates or calibrate PiSSA directions, measure NLL before, train with optional early stopping, measure after.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Optional

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from .data import cycle, evaluate, to_device
from .pissa import calibrate
from .selection import select_gates
from .tuners.loggate import GateConfig
from .tuners.mpissa import ModulatedPissaConfig


def fit(
    model,
    train_batches: Sequence[dict],
    steps: int = 240,
    lr: float = 5e-3,
    weight_decay: float = 0.0,
    eval_batches: Optional[Sequence[dict]] = None,
    eval_every: int = 20,
    patience: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """AdamW on every parameter with ``requires_grad`` (the active adapter) for ``steps`` steps; returns a report.

    With ``eval_batches``, the model is evaluated every ``eval_every`` steps; the best-eval-NLL parameters are restored
    at the end, and with ``patience`` training stops after that many evaluations without improvement.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: is an adapter active and not in inference mode?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    report = {"steps": 0, "lr": lr, "train_loss": [], "eval": []}
    best_nll, best_state, stale = float("inf"), None, 0
    start = time.perf_counter()
    model.train()
    batches = cycle(train_batches)
    for step in tqdm(range(1, steps + 1), disable=not progress, desc="fitting"):
        loss = model(**to_device(next(batches), device)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report["train_loss"].append(round(loss.item(), 6))
        report["steps"] = step
        if eval_batches is not None and (step % eval_every == 0 or step == steps):
            nll = evaluate(model, eval_batches)["nll"]
            model.train()
            report["eval"].append({"step": step, "nll": nll})
            if nll < best_nll:
                best_nll, stale = nll, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
    if best_state is not None:
        with torch.no_grad():
            for param, value in zip(params, best_state):
                param.copy_(value)
        report["best_eval_nll"] = best_nll
    model.eval()
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


# evaluation of the training set before/after uses at most this many batches (it is a sanity check, not the metric)
TRAIN_EVAL_BATCHES = 32


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "cuda allocator"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_of": "process RSS"}


def _before_after(before: dict, after: dict) -> dict:
    return {"nll_before": before["nll"], "nll_after": after["nll"], "exact_match_before": before["exact_match"],
            "exact_match_after": after["exact_match"], "examples": after["examples"]}


def fit_adapter(
    base_model,
    config,
    train_batches: Sequence[dict],
    eval_batches: Optional[Sequence[dict]] = None,
    rejected_batches: Optional[Sequence[dict]] = None,
    steps: int = 240,
    lr: float = 5e-3,
    eval_every: int = 20,
    patience: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
):
    """Add ``config``'s adapter to ``base_model`` and fit it; return ``(peft_model, report)``.

    Sparse gate controllers select their gates on ``train_batches`` first; PiSSA adapters whose selection needs
    activations are calibrated on them (``rejected_batches`` for ``cho_rej_min_std``). The report has NLL and exact
    match before and after on (up to ``TRAIN_EVAL_BATCHES`` of) the training batches and on ``eval_batches``, the
    selection and training times, the loss curve, and peak memory.
    """
    torch.manual_seed(seed)
    model = get_peft_model(base_model, config)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report: dict = {"peft_type": config.peft_type.value, "seed": seed, "steps": steps, "lr": lr}
    start = time.perf_counter()
    if isinstance(config, GateConfig) and config.num_gates is not None:
        report["selection"] = select_gates(model, train_batches, progress=progress)
    elif isinstance(config, ModulatedPissaConfig) and config.selection != "s_only":
        report["calibration"] = calibrate(model, train_batches, rejected_batches, progress=progress)
    report["selection_seconds"] = round(time.perf_counter() - start, 3)
    train_probe = list(train_batches[:TRAIN_EVAL_BATCHES])
    before = {"train": evaluate(model, train_probe)}
    if eval_batches:
        before["eval"] = evaluate(model, eval_batches)
    fitted = fit(model, train_batches, steps=steps, lr=lr, eval_batches=eval_batches or None, eval_every=eval_every,
                 patience=patience, progress=progress)
    report["train"] = _before_after(before["train"], evaluate(model, train_probe))
    report["eval"] = _before_after(before["eval"], evaluate(model, eval_batches)) if eval_batches else None
    report.update({
        "steps_run": fitted["steps"], "train_seconds": fitted["seconds"], "best_eval_nll": fitted.get("best_eval_nll"),
        "eval_curve": fitted["eval"], "train_loss": fitted["train_loss"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **peak_memory(device),
    })
    return model, report
