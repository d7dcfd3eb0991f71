"""Fit the trainable adapter parameters of a model on completion-only teacher-forced NLL."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import cycle, evaluate, to_device


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
