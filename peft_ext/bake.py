"""History bakes: fold the kept adapters of earlier rounds into one frozen low-rank adapter; train the next round on top.

Round ``k`` kept at coefficient ``c_k`` contributes ``c_k · delta_k(x) = B_k (A_k x)`` per module:
modulated LoRA and PEFT LoRA ``A_k = A``, ``B_k = c_k · scale · B``; modulated PiSSA ``A_k = V_rᵀ``,
``B_k = U_r diag(c_k Δs)``; an earlier bake ``A_k = A``, ``B_k = c_k B``. Stacked: ``A_cat = [A_1; A_2; …]`` and
``B_cat = [B_1, B_2, …]``, one matmul pair per module however many rounds.

Compression is exact up to round-off: ``B_cat = Q_b R_b``, ``A_catᵀ = Q_a R_a``, ``R_b R_aᵀ = U S Vᵀ``, then
``B = Q_b U S^½`` and ``A = S^½ Vᵀ Q_aᵀ`` (computed in fp64). Truncating ``S`` to ``max_rank`` or to a kept ``energy``
fraction of ``Σσ²`` leaves the relative Frobenius error ``sqrt(Σ_dropped σ² / Σ σ²)``, which is reported per module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key
from torch import nn
from tqdm.auto import tqdm

from .loading import AdapterFileError, read_adapter_files
from .tuners.common import ADAPTER_DTYPE, tuner_of
from .tuners.hbake import HistoryBakeConfig, HistoryBakeLayer, HistoryBakeModel

BAKEABLE_TYPES = ("MLORA", "MPISSA", "LORA", "HBAKE")
_PARAMETER_PREFIX = {"MLORA": "mlora_", "MPISSA": "mpissa_", "LORA": "lora_", "HBAKE": "hbake_"}
_EXPECTED = {
    "MLORA": {"mlora_A", "mlora_B"},
    "MPISSA": {"mpissa_u", "mpissa_s", "mpissa_vt", "mpissa_delta_s"},
    "LORA": {"lora_A.weight", "lora_B.weight"},
    "HBAKE": {"hbake_A", "hbake_B"},
}
# LoRA options that change its forward beyond ``scale · B A x``; such adapters are refused rather than baked wrongly
_LORA_VARIANTS = ("fan_in_fan_out", "use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens",
                  "monteclora_config", "layer_replication", "target_parameters", "use_bdlora", "arrow_config",
                  "kasa_config", "trainable_token_indices", "velora_config", "modules_to_save")
_FP32_EPS = torch.finfo(torch.float32).eps


class RoundError(ValueError):
    """A kept round cannot be baked: unreadable files, an unsupported adapter, or an adapter of another model."""


@dataclass
class KeptRound:
    """One round read from disk with its coefficient and scale folded in: ``factors[path] = (A_k, B_k)``."""

    source: str
    peft_type: str
    coefficient: float
    base_model: Optional[str]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    provenance: list[dict]


def _group_by_module(tensors: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {parameter name: tensor}}`` from saved keys ``base_model.model.<path>.<prefix...>``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix("base_model.model.").split(".")
        split = next((i for i, part in enumerate(parts) if part.startswith(prefix)), None)
        if not split:
            raise RoundError(f"{source}: tensor {key!r} is not a low-rank factor (modules_to_save and other full "
                             "modules cannot be baked)")
        grouped.setdefault(".".join(parts[:split]), {})[".".join(parts[split:])] = tensor.to(ADAPTER_DTYPE)
    return grouped


def _factors(peft_type: str, params: dict, config: dict, path: str, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_k, B_k)`` of one module with the coefficient ``c`` and the family's scale folded into ``B_k``."""
    if peft_type == "MLORA":
        a, b = params["mlora_A"], params["mlora_B"]
        return a, b * (c * config["alpha"] / config["r"])
    if peft_type == "LORA":
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        alpha_pattern = config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), path), config["lora_alpha"])
        rank = a.shape[0]
        return a, b * (c * alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    if peft_type == "MPISSA":
        return params["mpissa_vt"], params["mpissa_u"] * (c * params["mpissa_delta_s"])
    return params["hbake_A"], params["hbake_B"] * c


def read_round(source: str, coefficient: float) -> KeptRound:
    """Read one saved adapter (folder or Hub id) and fold ``coefficient`` into its factors; nothing is modified."""
    source = str(source)
    if not math.isfinite(coefficient):
        raise RoundError(f"{source}: coefficient {coefficient} is not finite")
    try:
        saved = read_adapter_files(source)
    except AdapterFileError as error:
        raise RoundError(str(error)) from None
    return fold_round(source, saved.config, saved.tensors, coefficient)


def fold_round(source: str, config: dict, tensors: dict[str, torch.Tensor], coefficient: float) -> KeptRound:
    """The factors of an adapter's saved tensors with ``coefficient`` and the family's scale folded in."""
    peft_type = config.get("peft_type")
    if peft_type not in BAKEABLE_TYPES:
        raise RoundError(f"{source}: a {peft_type} adapter cannot be baked; bakes keep low-rank weight deltas "
                         f"({', '.join(BAKEABLE_TYPES)}). A log-gate controller scales block outputs, not weights.")
    if peft_type == "LORA":
        variants = [name for name in _LORA_VARIANTS if config.get(name)] + (["bias"] if config.get("bias", "none") != "none" else [])
        if variants:
            raise RoundError(f"{source}: LoRA with {variants} is not a plain low-rank delta and cannot be baked")
    if peft_type == "MPISSA" and config.get("quarantine"):
        raise RoundError(f"{source}: this PiSSA round still has its quarantine knob Δs_hack; call "
                         "peft_ext.drop_quarantine(model) and save it again (a bake keeps the deployed Δs only)")
    broken = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise RoundError(f"{source}: NaN or inf in {broken[:3]}")
    grouped = _group_by_module(tensors, _PARAMETER_PREFIX[peft_type], source)
    if not grouped:
        raise RoundError(f"{source}: {SAFETENSORS_WEIGHTS_NAME} holds no adapter tensors")
    factors = {}
    for path, params in grouped.items():
        if set(params) != _EXPECTED[peft_type]:
            raise RoundError(f"{source}: module {path} has tensors {sorted(params)}, expected "
                             f"{sorted(_EXPECTED[peft_type])} for a {peft_type} adapter")
        a, b = _factors(peft_type, params, config, path, coefficient)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise RoundError(f"{source}: module {path} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                             "which do not form a low-rank product")
        factors[path] = (a, b)
    if peft_type == "HBAKE":
        provenance = [{**kept, "coefficient": kept["coefficient"] * coefficient} for kept in config.get("rounds", [])]
    else:
        provenance = [{"source": source, "peft_type": peft_type, "coefficient": coefficient,
                       "max_rank": max(a.shape[0] for a, _ in factors.values()), "modules": len(factors)}]
    return KeptRound(source, peft_type, coefficient, config.get("base_model_name_or_path"), factors, provenance)


def _check_fits(model: nn.Module, kept: KeptRound) -> None:
    modules = dict(model.named_modules())
    for path, (a, b) in kept.factors.items():
        module = modules.get(path)
        if not isinstance(module, nn.Linear):
            found = "missing" if module is None else f"a {type(module).__name__}, not a linear layer"
        elif (module.out_features, module.in_features) != (b.shape[0], a.shape[1]):
            found = f"{module.out_features}x{module.in_features}, the adapter's delta is {b.shape[0]}x{a.shape[1]}"
        else:
            continue
        raise RoundError(f"{kept.source} was fitted to a different model (base {kept.base_model!r}): module {path} "
                         f"is {found} in this one")


def compress_factors(a: torch.Tensor, b: torch.Tensor, max_rank: Optional[int] = None, energy: Optional[float] = None):
    """Re-factor ``B A`` by QR of both factors and an SVD of the small core; return ``(A', B', relative_error)``.

    Without ``max_rank``/``energy`` only numerically zero directions (σ ≤ σ_max · fp32 eps) are dropped, so ``B'A'``
    equals ``BA`` to fp32 round-off; with them the error of the truncation is returned (relative Frobenius norm).
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    total = float((s**2).sum())
    keep = int((s > s[0] * _FP32_EPS).sum()) if total > 0 else 0
    if energy is not None and total > 0:
        keep = min(keep, int(((s**2).cumsum(0) / total < energy).sum()) + 1)
    if max_rank is not None:
        keep = min(keep, max_rank)
    error = math.sqrt(float((s[keep:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:keep].sqrt()
    return (root[:, None] * (vh[:keep] @ q_a.T)).to(ADAPTER_DTYPE), ((q_b @ u[:, :keep]) * root).to(ADAPTER_DTYPE), error


def stack_rounds(kept: Sequence[KeptRound], compress: bool = True, max_rank: Optional[int] = None,
                 energy: Optional[float] = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Per module ``(A_cat, B_cat)`` of the kept rounds (compressed unless ``compress=False``) and the truncation errors.

    Modules on which the rounds cancel exactly are left out.
    """
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for kept_round in kept:
        for path, factors in kept_round.factors.items():
            parts.setdefault(path, []).append(factors)
    stacked, errors = {}, {}
    for path in tqdm(sorted(parts), desc="baking", disable=None):
        a = torch.cat([a for a, _ in parts[path]])
        b = torch.cat([b for _, b in parts[path]], dim=1)
        if compress:
            a, b, errors[path] = compress_factors(a, b, max_rank, energy)
            if a.shape[0] == 0:
                del errors[path]
                continue  # the kept rounds cancel (or are zero) on this module
        stacked[path] = (a, b)
    return stacked, errors


def bake(
    base_model: nn.Module,
    rounds: Sequence[tuple[str, float]],
    max_rank: Optional[int] = None,
    energy: Optional[float] = None,
    compress: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    """Fold ``rounds = [(adapter folder or Hub id, coefficient), ...]`` into one frozen history-bake adapter.

    Accepts modulated LoRA, modulated PiSSA, plain PEFT LoRA and earlier bakes (append a round by baking
    ``[(old_bake, 1.0), (new_round, c)]``). Ranks may differ between rounds and a module may be missing from some.
    Every round is read and checked against ``base_model`` before the model is touched. Save the result with
    ``save_pretrained``; it loads back with ``PeftModel.from_pretrained(base, folder)`` after ``import peft_ext``.
    """
    if not rounds:
        raise ValueError("rounds is empty: pass [(adapter_dir_or_hub_id, coefficient), ...]")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank={max_rank!r}: must be a positive integer")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy!r}: must be in (0, 1]")
    if not compress and (max_rank is not None or energy is not None):
        raise ValueError("max_rank/energy truncate during compression; they need compress=True")
    if any(isinstance(module, BaseTunerLayer) for module in base_model.modules()):
        raise ValueError("base_model already has adapters; bake onto the plain base model (bake an earlier bake by "
                         "listing its folder as a round)")
    kept = [read_round(source, coefficient) for source, coefficient in rounds]
    for kept_round in kept:
        _check_fits(base_model, kept_round)
    baked, errors = stack_rounds(kept, compress, max_rank, energy)
    if not baked:
        raise ValueError("every kept round is zero on every module; there is nothing to bake")
    config = HistoryBakeConfig(
        ranks={path: a.shape[0] for path, (a, _) in baked.items()},
        rounds=[entry for kept_round in kept for entry in kept_round.provenance],
        compressed=compress, max_rank=max_rank, energy=energy, relative_error=errors,
    )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    modules = dict(model.get_base_model().named_modules())
    with torch.no_grad():
        for path, (a, b) in baked.items():
            modules[path].hbake_A[adapter_name].copy_(a)
            modules[path].hbake_B[adapter_name].copy_(b)
    return model


def add_round(history_model: PeftModel, config, adapter_name: str = "default") -> PeftModel:
    """A new trainable adapter (``config``: modulated LoRA or PiSSA, or gates) on top of a loaded history bake.

    PEFT keeps one adapter type per ``PeftModel``, so the two are stacked: the bake's layers stay inside the model and
    the new round wraps them. The returned ``PeftModel`` trains and saves only the new round; its file has the keys of
    an adapter fitted on the plain base, so it loads there and can be appended to the bake with :func:`bake`.
    """
    tuner_of(history_model, HistoryBakeModel, "history bake")
    if isinstance(config, HistoryBakeConfig):
        raise ValueError("the new round must be a trainable adapter; to extend the history, bake it with peft_ext.bake")
    with warnings.catch_warnings():
        # both warnings are about the stacking done here on purpose (a bake's layers and peft_config are present)
        warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
        return get_peft_model(history_model.get_base_model(), config, adapter_name=adapter_name)


@contextmanager
def reference(model: nn.Module, *, include_history: bool):
    """The reference forward for a KL term while training a round: inside the block the trainable round is off.

    ``include_history=False`` switches the history bake off too (the pristine base model, bit-identical);
    ``include_history=True`` keeps it (base + bake; on a model without a bake that is the base model). Only the on/off
    flags change (no ``requires_grad`` flips), and they are restored on exit, also after an error.
    """
    switches = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    if not switches:
        raise TypeError(f"{type(model).__name__} has no adapters; the reference forward is the model itself")
    merged = [type(m).__name__ for m in switches if isinstance(m, BaseTunerLayer) and m.merged]
    if merged:
        raise ValueError(f"{len(merged)} layers have merged adapters, which cannot be switched off; unmerge first")
    saved = [(module, module._disable_adapters) for module in switches]
    try:
        for module in switches:
            module._disable_adapters = not (include_history and isinstance(module, HistoryBakeLayer))
        yield
    finally:
        for module, disabled in saved:
            module._disable_adapters = disabled
