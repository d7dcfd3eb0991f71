"""Look at saved adapters without a model (inspect, lint, model card) and at a base model (doctor).

Everything here reads the ``adapter_config.json`` and ``adapter_model.safetensors`` that ``save_pretrained`` wrote (and
``provenance.json`` when present); nothing is loaded with pickle.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Optional

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.lora import LoraLayer

from .bake import BAKEABLE_TYPES, RoundError, fold_round
from .compose import delta_inner, plan_lowrank, saved_gate_values
from .io import atomic_write
from .loading import SavedAdapter, read_adapter_files
from .provenance import read_provenance
from .tuners import FAMILIES
from .tuners.common import find_decoder_blocks

# tensors that train, per adapter type (names inside the saved keys): what each tuner layer declares
TRAINABLE_TENSORS = {name: model_cls.tuner_layer_cls.adapter_layer_names for name, _, model_cls in FAMILIES}
TRAINABLE_TENSORS["LORA"] = LoraLayer.adapter_layer_names
FAMILY_NAMES = {"LOGGATE": "log-gate controller", "MLORA": "modulated LoRA", "MPISSA": "modulated PiSSA",
                "HBAKE": "history bake", "LORA": "LoRA"}
SATURATION = 0.99  # a gate with |s| >= SATURATION * max_log_gate sits at its bound
HISTOGRAM_BINS = 10


def _parameter_counts(saved: SavedAdapter) -> dict:
    names = TRAINABLE_TENSORS.get(saved.peft_type, ())
    trainable = sum(t.numel() for key, t in saved.tensors.items() if any(f".{name}" in key for name in names))
    counts = {"saved_elements": sum(t.numel() for t in saved.tensors.values()), "trainable": trainable,
              "bytes": sum(t.numel() * t.element_size() for t in saved.tensors.values())}
    if saved.peft_type == "LOGGATE" and saved.config.get("num_gates") is not None:
        counts["free_gates"] = int(sum(t.sum() for key, t in saved.tensors.items() if ".loggate_mask" in key))
    return counts


def _gate_summary(saved: SavedAdapter) -> dict:
    blocks, gates, masks = saved_gate_values(saved)
    bound = float(saved.config.get("max_log_gate", 0.05))
    selected = gates[masks]
    histogram = torch.histc(selected, bins=HISTOGRAM_BINS, min=-bound, max=bound) if selected.numel() else None
    return {
        "max_log_gate": bound,
        "num_gates": saved.config.get("num_gates"),
        "per_block": [{"block": name, "selected": int(masks[i].sum()), "nonzero": int((gates[i] != 0).sum()),
                       "max_abs": float(gates[i].abs().max()), "mean_abs_selected": float(gates[i][masks[i]].abs().mean())
                       if masks[i].any() else 0.0} for i, name in enumerate(blocks)],
        "histogram": {"edges": torch.linspace(-bound, bound, HISTOGRAM_BINS + 1).tolist(),
                      "counts": histogram.long().tolist() if histogram is not None else []},
        "saturated": int((selected.abs() >= SATURATION * bound).sum()),
    }


def _lowrank_summary(saved: SavedAdapter) -> dict:
    """Rank and ``‖ΔW‖_F`` (at coefficient 1) per target module."""
    kept = fold_round(saved.source, saved.config, saved.tensors, 1.0)
    return {"targets": {path: {"rank": int(a.shape[0]), "delta_norm": math.sqrt(max(delta_inner(a, b, a, b), 0.0)),
                               "shape": [int(b.shape[0]), int(a.shape[1])]}
                        for path, (a, b) in sorted(kept.factors.items())}}


def inspect_adapter(source: str | Path, saved: Optional[SavedAdapter] = None) -> dict:
    """Type, base model, targets, parameter counts, and per family a gate histogram by block or rank and norm per target."""
    saved = saved or read_adapter_files(source)
    report = {
        "adapter": saved.source,
        "peft_type": saved.peft_type,
        "family": FAMILY_NAMES.get(saved.peft_type, saved.peft_type),
        "base_model": saved.config.get("base_model_name_or_path"),
        "revision": saved.config.get("revision"),
        "parameters": _parameter_counts(saved),
        "tensors": len(saved.tensors),
    }
    finite = all(torch.isfinite(t).all() for t in saved.tensors.values() if t.is_floating_point())
    if not finite:
        report["problem"] = "non-finite values in the saved tensors"
    elif saved.peft_type == "LOGGATE":
        report["gates"] = _gate_summary(saved)
    elif saved.peft_type in BAKEABLE_TYPES:
        try:
            report.update(_lowrank_summary(saved))
        except RoundError as error:
            report["problem"] = str(error)
    return report


def overlap(first: SavedAdapter, second: SavedAdapter) -> dict:
    """How two adapters overlap: gates (Jaccard of masks, cosine of log-gates) or low-rank (subspaces, delta cosine)."""
    pair = {"adapters": [first.source, second.source]}
    types = {first.peft_type, second.peft_type}
    if types == {"LOGGATE"}:
        blocks_1, gates_1, masks_1 = saved_gate_values(first)
        blocks_2, gates_2, masks_2 = saved_gate_values(second)
        if blocks_1 != blocks_2 or gates_1.shape != gates_2.shape:
            return {**pair, "comparable": False, "reason": "the controllers gate different blocks or widths"}
        union = int((masks_1 | masks_2).sum())
        norm = float(gates_1.norm() * gates_2.norm())
        return {**pair, "comparable": True, "jaccard": int((masks_1 & masks_2).sum()) / union if union else 0.0,
                "cosine": float((gates_1 * gates_2).sum()) / norm if norm > 0 else 0.0}
    if types <= set(BAKEABLE_TYPES):
        plan = plan_lowrank([(first.source, 1.0), (second.source, 1.0)])
        if plan["blocking"]:
            return {**pair, "comparable": False, "reason": plan["blocking"][0]}
        summary = {key: value for key, value in plan["pairs"][0].items() if key not in ("modules", "adapters")}
        return {**pair, "comparable": True, **summary}
    return {**pair, "comparable": False, "reason": f"different kinds of adapter ({' vs '.join(sorted(types))})"}


def inspect_adapters(sources: list[str]) -> dict:
    saved = [read_adapter_files(source) for source in sources]
    return {"adapters": [inspect_adapter(s.source, s) for s in saved],
            "overlap": [overlap(a, b) for a, b in itertools.combinations(saved, 2)]}


def lint_adapter(source: str | Path) -> list[dict]:
    """Findings ``{"level": "error" | "warning", "code", "message"}`` about a saved adapter."""
    saved = read_adapter_files(source)
    findings = []

    def add(level: str, code: str, message: str) -> None:
        findings.append({"level": level, "code": code, "message": message})

    if saved.peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        add("error", "unknown_type", f"peft_type {saved.peft_type!r} is not registered with PEFT in this process")
    broken = [key for key, t in saved.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        add("error", "nan_inf", f"NaN or inf in {len(broken)} tensors, e.g. {broken[0]}")
    base = saved.config.get("base_model_name_or_path")
    if not base:
        add("warning", "base_model_unrecorded", "adapter_config.json does not name the base model")
    elif not Path(base).is_dir() and not saved.config.get("revision"):
        add("warning", "revision_unpinned", f"base model {base!r} has no pinned revision; a later upload to the Hub "
            "can silently change the weights under this adapter (fit with --revision)")
    recorded = read_provenance(source) if Path(source).is_dir() else None
    if not (recorded or {}).get("fingerprint"):
        add("warning", "fingerprint_absent", "no base-model fingerprint (provenance.json); loading cannot check that "
            "the base weights are the ones the adapter was fitted on")
    if broken:
        return findings
    if saved.peft_type == "LOGGATE":
        _lint_gates(saved, add)
    elif saved.peft_type in BAKEABLE_TYPES:
        if saved.peft_type == "MPISSA" and saved.config.get("quarantine"):
            add("warning", "quarantine_present", "the quarantine knob Δs_hack is still attached; "
                "peft_ext.drop_quarantine(model) before deployment")
        else:
            try:
                factors = fold_round(saved.source, saved.config, saved.tensors, 1.0).factors
                if all(float(b.abs().max()) == 0.0 for _, b in factors.values()):
                    add("warning", "identity", "every delta is zero: the adapter is the base model (never trained?)")
            except RoundError as error:
                add("warning", "not_plain_lowrank", str(error))
    return findings


def _lint_gates(saved: SavedAdapter, add) -> None:
    blocks, gates, masks = saved_gate_values(saved)
    bound = float(saved.config.get("max_log_gate", 0.05))
    if saved.config.get("num_gates") is not None and not masks.any():
        add("error", "no_gates_selected", "a sparse controller with no selected gate (select_gates was never run)")
        return
    if not gates.any():
        add("warning", "identity", "every log-gate is zero: the controller is the base model (never trained?)")
        return
    saturated = int((gates[masks].abs() >= SATURATION * bound).sum())
    if saturated:
        add("warning", "saturated_gates", f"{saturated} of {int(masks.sum())} gates sit at the bound ±{bound} "
            f"(|s| >= {SATURATION}·max_log_gate): the bound, not the data, limits them; refit with a larger max_log_gate")
    used = [name for i, name in enumerate(blocks) if gates[i].any()]
    if len(used) == 1 and len(blocks) > 1:
        add("warning", "single_layer", f"every non-zero gate is in one block ({used[0]}) of {len(blocks)}")


def model_card(source: str | Path, location: Optional[str] = None) -> str:
    """The README.md model card of a saved adapter: what it is, how to load it, intended use, limitations, stats.

    ``location`` is where users will load it from (default: ``source``), for the loading snippet and the title.
    """
    saved = read_adapter_files(source)
    location = str(location or source)
    info = inspect_adapter(saved.source, saved)
    provenance = read_provenance(source) if Path(source).is_dir() else None
    peft_type, family = saved.peft_type, info["family"]
    base = info["base_model"] or "<base model>"
    revision = f', revision="{info["revision"]}"' if info["revision"] else ""
    lines = [
        "---", "library_name: peft", f"base_model: {base}", "tags:", "- peft", "- peft-ext", f"- {peft_type.lower()}",
        "---", "", f"# {Path(location).name}: a {family} adapter for `{base}`", "",
        _DESCRIPTIONS.get(peft_type, f"A {peft_type} adapter."), "",
        "## How to load", "", "```python",
        f"import peft_ext  # registers the {peft_type} adapter type with PEFT: pip install peft-ext",
        "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}"{revision})',
        f'model = PeftModel.from_pretrained(base, "{location}")', "```", "",
        f"Without `import peft_ext`, PEFT fails with `KeyError: '{peft_type}'`.", "",
        "## Intended use", "", _USES.get(peft_type, "As for any PEFT adapter of its type."), "",
        "## Limitations", "", *[f"- {text}" for text in _LIMITS.get(peft_type, [])],
        "- Evaluated only on the data named below; behaviour outside that distribution was not measured.", "",
        "## Statistics", "",
        f"- saved tensors: {info['tensors']}, elements: {info['parameters']['saved_elements']:,}, "
        f"trainable: {info['parameters']['trainable']:,}",
    ]
    if "gates" in info:
        gates = info["gates"]
        active = sum(1 for block in gates["per_block"] if block["nonzero"])
        lines.append(f"- log-gates: bound ±{gates['max_log_gate']}, {sum(b['nonzero'] for b in gates['per_block'])} "
                     f"non-zero in {active} of {len(gates['per_block'])} blocks, {gates['saturated']} saturated")
    if "targets" in info:
        ranks = [t["rank"] for t in info["targets"].values()]
        lines.append(f"- target modules: {len(ranks)}, rank {min(ranks)}-{max(ranks)}")
    lines += ["", "## Provenance", ""]
    if provenance:
        lines.append(f"- base model: `{provenance.get('base_model')}` revision `{provenance.get('revision')}`")
        fingerprint = provenance.get("fingerprint") or {}
        lines.append(f"- base fingerprint: architecture `{fingerprint.get('architecture', '')[:16]}`, "
                     f"weights `{fingerprint.get('weights', '')[:16]}`")
        for role, data in (provenance.get("data") or {}).items():
            lines.append(f"- {role} data: `{Path(data['path']).name}` sha256 `{data['sha256'][:16]}`")
        report = provenance.get("fit_report") or {}
        if report:
            lines.append(f"- fit: {report.get('method')}, {report.get('steps_run')} steps, train NLL "
                         f"{report.get('train', {}).get('nll_before', float('nan')):.4f} -> "
                         f"{report.get('train', {}).get('nll_after', float('nan')):.4f}")
            if report.get("eval"):
                lines.append(f"- held-out NLL {report['eval']['nll_before']:.4f} -> {report['eval']['nll_after']:.4f}, "
                             f"exact match {report['eval']['exact_match_before']:.1%} -> "
                             f"{report['eval']['exact_match_after']:.1%}")
    else:
        lines.append("- no provenance.json: base fingerprint and data hashes were not recorded")
    return "\n".join(lines) + "\n"


def write_card(source: str | Path, location: Optional[str] = None) -> Path:
    """Write the model card into the adapter folder as README.md (atomically)."""
    text = model_card(source, location)
    return atomic_write(Path(source) / "README.md", lambda temporary: Path(temporary).write_text(text))


_DESCRIPTIONS = {
    "LOGGATE": "A sparse set of signed log-gates on decoder-block output channels: `h' = exp(s) * h`, "
               "`s = max_log_gate * tanh(raw)`. No weight of the base model is touched.",
    "MLORA": "A low-rank delta `y + c * (alpha/r) * B(Ax)` with a runtime coefficient `c` "
             "(`peft_ext.set_coefficient`; `c = 0` is the base model, `-c` steers the other way).",
    "MPISSA": "A vector `Δs` on `r` singular directions of each weight: `y + c * U_r((V_r^T x) * Δs)` with a runtime "
              "coefficient `c` (`c = 0` is the base model).",
    "HBAKE": "Earlier adapters kept at chosen coefficients, folded into one frozen low-rank delta `y + B(Ax)` per module.",
}
_USES = {
    "LOGGATE": "Steering the base model towards the behaviour of its fit data with a few thousand numbers; composing "
               "with other controllers (`peft-ext compose`).",
    "MLORA": "Steering with a tunable strength and sign; stacking on a history bake for the next training round.",
    "MPISSA": "Steering along the base weights' own singular directions with a tunable strength and sign.",
    "HBAKE": "A frozen reference for the next training round, or a deployed sum of earlier rounds.",
}
_LIMITS = {
    "LOGGATE": ["Each gate is bounded by ±max_log_gate: large behaviour changes are out of reach by design.",
                "Not mergeable into the weights (a block-output scale is not a weight edit)."],
    "MLORA": ["Merging into a 4-bit base requantises the weights (lossy)."],
    "MPISSA": ["Merging into a 4-bit base requantises the weights (lossy)."],
    "HBAKE": ["Frozen: nothing in it trains.", "Truncated bakes record their error per module in adapter_config.json."],
}


def doctor(model, tokenizer, max_log_gate: float = 0.05) -> dict:
    """What peft_ext needs to know about a base model, and one forward pass; ``problems`` lists what will not work."""
    problems, warnings = [], []
    report: dict = {"model_class": type(model).__name__}
    try:
        path, blocks = find_decoder_blocks(model)
        report["decoder_blocks"] = {"path": path, "count": len(blocks)}
    except ValueError as error:
        problems.append(str(error))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    report["hidden_size"] = getattr(config, "hidden_size", None)
    floating = [p for p in model.parameters() if p.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    report["dtype"] = str(dtype).removeprefix("torch.")
    quantized = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")})
    report["quantized_layers"] = quantized
    report["tokenizer"] = {
        "class": type(tokenizer).__name__, "fast": bool(getattr(tokenizer, "is_fast", False)),
        "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), "size": len(tokenizer),
    }
    if tokenizer.eos_token is None:
        warnings.append("the tokenizer has no EOS token: completions are supervised without an end marker")
    vocabulary = getattr(config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocabulary}")
    # a gate scales a hidden state stored in `dtype`: |s| below half an ulp at 1 changes nothing after rounding
    step = torch.finfo(dtype).eps / 2
    report["log_gate_resolution"] = {"smallest_effective_log_gate": step, "max_log_gate": max_log_gate,
                                     "steps_in_bound": max_log_gate / step}
    if max_log_gate / step < 8:
        warnings.append(f"in {report['dtype']} a log-gate bound of {max_log_gate} spans only "
                        f"{max_log_gate / step:.1f} representable steps; raise max_log_gate or use fp32")
    report["bitsandbytes"] = _bitsandbytes_status()
    ids = tokenizer("Hello, world", return_tensors="pt")["input_ids"].to(floating[0].device if floating else "cpu")
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    report["forward"] = {"tokens": int(ids.shape[1]), "seconds": round(time.perf_counter() - start, 4),
                         "finite": bool(torch.isfinite(logits).all())}
    if not report["forward"]["finite"]:
        problems.append("the forward pass produced NaN or inf logits")
    report["problems"], report["warnings"] = problems, warnings
    return report


def _bitsandbytes_status() -> dict:
    try:
        import bitsandbytes
        from bitsandbytes.functional import has_avx512bf16
    except ImportError as error:
        return {"available": False, "reason": str(error)}
    return {"available": True, "version": bitsandbytes.__version__, "cuda": torch.cuda.is_available(),
            "cpu_avx512_bf16": bool(has_avx512bf16())}
