"""Pieces every family shares: where the decoder blocks are, which of them to target, and the dtype policy.

Dtype policy: adapter parameters live in fp32 (``ADAPTER_DTYPE``); adapter math runs in fp32 on top of the base layer's
output and the result is cast back to the output's dtype once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

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


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``module``; CPU for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
