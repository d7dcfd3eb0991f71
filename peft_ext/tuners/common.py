"""Pieces every family shares: where the decoder blocks are, which of them to target, and the dtype policy.

Dtype policy: adapter parameters live in fp32 (``ADAPTER_DTYPE``); adapter math runs in fp32 on top of the base layer's
output and the result is cast back to the output's dtype once.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write

ADAPTER_DTYPE = torch.float32

# Attribute paths (relative to the model handed to PEFT) under which Hugging Face models keep their decoder blocks.
DECODER_BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
    "decoder.layers",
    "h",
    "blocks",
)

_LAST_N = re.compile(r"last:(\d+)")


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)`` of the decoder-block ``ModuleList`` of ``model`` (paths in ``DECODER_BLOCK_PATHS``)."""
    for path in DECODER_BLOCK_PATHS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None) if isinstance(module, nn.Module) else None
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    raise ValueError(
        f"could not find the decoder blocks of {type(model).__name__}: none of {', '.join(DECODER_BLOCK_PATHS)} is a "
        "non-empty nn.ModuleList. Pass `target_modules` with the block module names (or a regex) explicitly."
    )


def parse_layers(layers: str | Sequence[int], num_blocks: int) -> list[int]:
    """Block indices selected by ``layers``: ``"all"``, ``"last:N"`` or explicit indices in ``[0, num_blocks)``."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_blocks))
        match = _LAST_N.fullmatch(layers)
        if match is None:
            raise ValueError(f"layers={layers!r}: expected 'all', 'last:N' or a list of block indices")
        count = int(match.group(1))
        if not 1 <= count <= num_blocks:
            raise ValueError(f"layers={layers!r}: N must be in [1, {num_blocks}] for a model with {num_blocks} blocks")
        return list(range(num_blocks - count, num_blocks))
    indices = [int(i) for i in layers]
    bad = [i for i in indices if not 0 <= i < num_blocks]
    if bad or not indices or len(set(indices)) != len(indices):
        raise ValueError(
            f"layers={list(layers)}: need distinct block indices in [0, {num_blocks}) (bad: {bad or 'duplicates/empty'})"
        )
    return sorted(indices)


def validate_layers_spec(layers: str | Sequence[int]) -> None:
    """Check the form of a ``layers`` spec before the model (and its block count) is known."""
    if isinstance(layers, str):
        if layers != "all" and _LAST_N.fullmatch(layers) is None:
            raise ValueError(f"layers={layers!r}: expected 'all', 'last:N' or a list of block indices")
    elif not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers={layers!r}: block indices must be integers")


def check_adapter_name(adapter_name: str) -> None:
    """Refuse a name torch cannot use as a key of the adapters' ``ParameterDict``/``ModuleDict``, before anything is
    wrapped."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter name {adapter_name!r} cannot be used: it must be a non-empty string without '.', since torch "
            f"parameter names cannot contain one; use e.g. {str(adapter_name).replace('.', '_') or 'default'!r}"
        )


def tuner_of(model: nn.Module, tuner_cls: type, family: str):
    """The ``tuner_cls`` tuner of a ``PeftModel`` (or the tuner itself); a clear error for any other model."""
    tuner = model if isinstance(model, tuner_cls) else getattr(model, "base_model", None)
    if not isinstance(tuner, tuner_cls):
        raise TypeError(f"{type(model).__name__} has no {family} adapters (get_peft_model(model, <its config>) first)")
    return tuner


def resolve_adapter(tuner, adapter_name: str | None) -> str:
    """``adapter_name`` if given (it must exist), else the single active adapter."""
    if adapter_name is None:
        if len(tuner.active_adapters) != 1:
            raise ValueError(f"{len(tuner.active_adapters)} adapters are active ({tuner.active_adapters}); "
                             "pass adapter_name=...")
        adapter_name = tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(tuner.peft_config)}")
    return adapter_name


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``module``; CPU for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def svd(weight: torch.Tensor, cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) Vh`` in fp32 (on ``weight``'s device), optionally cached on disk.

    The cache file is keyed by a SHA-256 of the fp32 weight bytes and its shape, written atomically and read with
    safetensors only.
    """
    weight = weight.detach().to(ADAPTER_DTYPE)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(weight.cpu().contiguous().numpy().tobytes())
        digest.update(str(tuple(weight.shape)).encode())
        path = Path(cache_dir) / f"svd-{digest.hexdigest()[:40]}.safetensors"
        if path.is_file():
            cached = load_file(path, device=str(weight.device))
            return cached["U"], cached["S"], cached["Vh"]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    if path is not None:
        tensors = {"U": u.contiguous().cpu(), "S": s.cpu(), "Vh": vh.contiguous().cpu()}
        atomic_write(path, lambda temporary: save_file(tensors, temporary))
    return u, s, vh


def dequantized_weight(tuner_layer) -> torch.Tensor:
    """The base layer's weight as a float tensor (dequantised for bitsandbytes layers), without modifying the layer.

    bitsandbytes repacks a 4-bit weight for its CPU kernel on the first no-grad CPU forward; ``dequantize_4bit`` then
    misreads the data (errors of ~0.1 on the tiny models). Here the canonical layout is restored on copies first.
    """
    weight = getattr(tuner_layer.get_base_layer(), "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

        data, restored = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
        return dequantize_4bit(data, restored)
    # under DeepSpeed ZeRO-3 each rank holds a shard: gather the full weight and copy it before it is released
    with gather_params_ctx(weight, modifier_rank=None):
        return BaseTunerLayer.get_base_weight(tuner_layer).detach().clone()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks of the default process group (unchanged without one), on its own device.

    Statistics that choose adapter parameters from data (gate scores, PiSSA moments) go through this, so every rank of a
    data-parallel job chooses the same gates and directions from its own shard.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    reduced = tensor.to(device).clone()
    torch.distributed.all_reduce(reduced)
    return reduced.to(tensor.device)
