"""Loading adapters with errors that say what to do.

Without ``import peft_ext`` PEFT meets our adapter types with a bare ``KeyError('LOGGATE')``; these helpers check the
adapter's type before loading and turn that into an instruction.
"""

from __future__ import annotations

from typing import Any

import peft
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from .tuners import FAMILIES

OUR_PEFT_TYPES = frozenset(name for name, _, _ in FAMILIES)


class UnknownAdapterTypeError(RuntimeError):
    """The adapter's ``peft_type`` is not registered with PEFT in this process."""


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


def load_adapter_model(base_model, adapter: str, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(base_model, adapter, ...)`` with the adapter type checked first."""
    peft_type = check_adapter_type(adapter)
    try:
        return PeftModel.from_pretrained(base_model, adapter, adapter_name=adapter_name, **kwargs)
    except KeyError as error:
        if error.args and error.args[0] == peft_type:
            raise UnknownAdapterTypeError(unknown_type_message(peft_type, adapter)) from error
        raise
