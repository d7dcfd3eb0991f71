"""Loading adapters with errors that say what to do.

Without ``import peft_ext`` PEFT meets our adapter types with a bare ``KeyError('LOGGATE')``; these helpers check the
adapter's type before loading and turn that into an instruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import safe_open

from .tuners import FAMILIES

OUR_PEFT_TYPES = frozenset(name for name, _, _ in FAMILIES)


class UnknownAdapterTypeError(RuntimeError):
    """The adapter's ``peft_type`` is not registered with PEFT in this process."""


class AdapterMismatchError(ValueError):
    """The adapter's tensors do not match the modules of the base model it is loaded onto."""


def unknown_type_message(peft_type: str, source: str) -> str:
    if peft_type in OUR_PEFT_TYPES:
        return (
            f"{source} is a {peft_type} adapter, a type that peft_ext adds to PEFT, but it is not registered in this "
            "process: `pip install peft-ext` and `import peft_ext` before loading it."
        )
    return f"{source} has peft_type {peft_type!r}, which PEFT {peft.__version__} does not know (a newer PEFT or a plugin?)"


def check_adapter_type(adapter: str, **hub_kwargs: Any) -> str:
    """Return the ``peft_type`` of the adapter folder or hub id ``adapter``; raise if PEFT cannot load that type."""
    peft_type = PeftConfig._get_peft_type(adapter, **hub_kwargs)
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UnknownAdapterTypeError(unknown_type_message(peft_type, adapter))
    return peft_type


def check_keys_match(model: PeftModel, adapter_dir: Path, adapter_name: str) -> None:
    """Raise unless the saved tensor names equal the adapter tensors the model holds (PEFT only warns)."""
    with safe_open(adapter_dir / SAFETENSORS_WEIGHTS_NAME, framework="pt") as saved:
        saved_keys = set(saved.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing, extra = sorted(expected - saved_keys), sorted(saved_keys - expected)
    if missing or extra:
        base = model.peft_config[adapter_name].base_model_name_or_path
        raise AdapterMismatchError(
            f"{adapter_dir} does not fit this base model: {len(missing)} adapter tensors missing from the file "
            f"(e.g. {missing[:2]}), {len(extra)} in the file that the model has no place for (e.g. {extra[:2]}). "
            f"It was saved from {base!r}; load it onto that model."
        )


def load_adapter_model(base_model, adapter: str, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(base_model, adapter, ...)`` with the adapter type checked first and, for a local
    folder, every saved tensor matched to a module of the model (missing or extra tensors are an error)."""
    peft_type = check_adapter_type(adapter)
    try:
        model = PeftModel.from_pretrained(base_model, adapter, adapter_name=adapter_name, **kwargs)
    except KeyError as error:
        if error.args and error.args[0] == peft_type:
            raise UnknownAdapterTypeError(unknown_type_message(peft_type, adapter)) from error
        raise
    if (Path(adapter) / SAFETENSORS_WEIGHTS_NAME).is_file():
        check_keys_match(model, Path(adapter), adapter_name)
    return model
