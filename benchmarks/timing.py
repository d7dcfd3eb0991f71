"""Timing helpers shared by the benchmarks: interleaved repetitions in one process, medians, IQRs and ratios."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import bitsandbytes
import peft
import torch
import transformers

import peft_ext


def result_path(name: str) -> str:
    """``benchmarks/results/<name>.json``, wherever the script is run from: the default of every ``--out``."""
    return str(Path(__file__).resolve().parent / "results" / f"{name}.json")


def time_once(model, ids: torch.Tensor, train: bool) -> float:
    """Seconds for one forward (no grad) or one training step (forward, backward, zero_grad) of ``model``."""
    synchronize = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    if train:
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    else:
        with torch.no_grad():
            model(input_ids=ids)
    synchronize()
    return time.perf_counter() - start


def interleaved(models: dict, ids: torch.Tensor, repeats: int, train: bool = False) -> dict[str, list[float]]:
    """``{name: [seconds, ...]}``: one warm-up each, then ``repeats`` rounds with the variant order rotating."""
    names = list(models)
    for name in names:
        time_once(models[name], ids, train)
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            samples[name].append(time_once(models[name], ids, train))
    return samples


def summarize(samples: dict[str, list[float]], baselines: dict[str, str]) -> dict[str, dict]:
    """Median, IQR and ``ratio_to_<label>`` (median over the baseline's median) per variant, in milliseconds."""
    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows = {}
    for name, values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        rows[name] = {"median_ms": medians[name] * 1e3, "iqr_ms": (quartiles[2] - quartiles[0]) * 1e3}
        rows[name].update({f"ratio_to_{label}": medians[name] / medians[base] for label, base in baselines.items()})
        rows[name]["samples_ms"] = [v * 1e3 for v in values]
    return rows


def environment(device: str) -> dict:
    """Versions, device and thread count, recorded in every result file."""
    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "peft_ext": peft_ext.__version__,
                     "python": platform.python_version()},
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
    }


def step_memory(model, ids: torch.Tensor) -> dict:
    """Memory of one training step: the bytes autograd saves for backward (activations) and the trainable state
    (parameters + gradients + AdamW's two moments); on CUDA also the allocator's peak. In MiB."""
    saved: dict[tuple, int] = {}

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        saved[key] = tensor.numel() * tensor.element_size()
        return tensor

    if ids.is_cuda:
        torch.cuda.reset_peak_memory_stats(ids.device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    report = {"saved_activations_mib": sum(saved.values()) / 2**20, "trainable_state_mib": 4 * trainable / 2**20}
    if ids.is_cuda:
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated(ids.device) / 2**20
    return report
