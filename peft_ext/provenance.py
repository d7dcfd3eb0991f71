"""Where an adapter came from: base model and revision, a fingerprint of the base weights, data hashes, fit report.

Written next to the adapter as ``provenance.json`` (PEFT drops unknown keys from ``adapter_config.json``). The
fingerprint has two SHA-256 digests, both the same for fp32, bf16 and bitsandbytes 4-/8-bit loads of one checkpoint
(tested); an fp16 load rounds twice (fp32 -> fp16 -> bf16) and its ``weights`` digest can differ, which warns:

- ``architecture``: the model type and the shape of every linear and embedding layer (bnb layers keep their
  ``in_features``/``out_features``). A different value means another architecture: loading is an error.
- ``weights``: the parameters bitsandbytes never quantizes (embeddings, output head, 1-D norms and biases) rounded to
  bf16. A different value means other weights of the same shapes: a warning, an error in strict mode. A checkpoint that
  differs from the recorded one only in its linear weights is not detected.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .io import write_json
from .loading import AdapterMismatchError

PROVENANCE_NAME = "provenance.json"


class BaseWeightsWarning(UserWarning):
    """The adapter was fitted on other weights of the same architecture."""


def fingerprint(model: nn.Module) -> dict:
    """``{"architecture": sha256, "weights": sha256}`` of a model without adapters (see the module docstring)."""
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("fingerprint the base model before adapters are added (its module names change after)")
    shapes = hashlib.sha256(str(getattr(model.config, "model_type", type(model).__name__)).encode())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes.update(f"{name}:{module.out_features}x{module.in_features};".encode())
        elif isinstance(module, nn.Embedding):
            shapes.update(f"{name}:{module.num_embeddings}x{module.embedding_dim};".encode())
    kept = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        kept.update(id(p) for p in output.parameters())
    weights = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)  # DeepSpeed ZeRO-3 keeps a shard; ds_shape is the full shape
        if param.is_floating_point() and (len(shape) == 1 or id(param) in kept):
            with gather_params_ctx(param, modifier_rank=None):
                values = param.detach().to(torch.bfloat16).cpu().contiguous()
            weights.update(name.encode())
            weights.update(values.view(torch.int16).numpy().tobytes())
    return {"architecture": shapes.hexdigest(), "weights": weights.hexdigest()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_provenance(adapter_dir: str | Path, base_fingerprint: dict, base_model: str, revision: Optional[str] = None,
                     data_files: Optional[dict[str, str]] = None, fit_report: Optional[dict] = None) -> dict:
    """Write ``provenance.json`` into ``adapter_dir``; ``data_files`` maps a role (train, eval) to a file path."""
    record = {
        "base_model": base_model,
        "revision": revision,
        "fingerprint": base_fingerprint,
        "data": {role: {"path": str(path), "sha256": file_sha256(path)} for role, path in (data_files or {}).items()},
        "fit_report": fit_report,
    }
    write_json(Path(adapter_dir) / PROVENANCE_NAME, record)
    return record


def read_provenance(adapter_dir: str | Path) -> Optional[dict]:
    path = Path(adapter_dir) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def check_base(model: nn.Module, adapter_dir: str | Path, strict: bool = False) -> str:
    """Compare the model with the fingerprint recorded for ``adapter_dir``; return ``match``, ``absent`` or
    ``weights differ`` (a :class:`BaseWeightsWarning`, or an error when ``strict``). Another architecture is an error."""
    record = read_provenance(adapter_dir)
    recorded = (record or {}).get("fingerprint")
    if not recorded:
        if strict:
            raise AdapterMismatchError(f"{adapter_dir} records no base-model fingerprint; strict mode needs one")
        return "absent"
    current = fingerprint(model)
    base = record.get("base_model")
    if current["architecture"] != recorded["architecture"]:
        raise AdapterMismatchError(f"{adapter_dir} was fitted to another architecture ({base!r}); load it onto that model")
    if current["weights"] != recorded["weights"]:
        message = f"{adapter_dir} was fitted on other weights of this architecture ({base!r})"
        if strict:
            raise AdapterMismatchError(message + "; strict mode refuses it")
        warnings.warn(message, BaseWeightsWarning, stacklevel=2)
        return "weights differ"
    return "match"
