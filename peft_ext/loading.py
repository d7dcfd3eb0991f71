"""Loading base models and adapters with errors that say what to do.

Without ``import peft_ext`` PEFT meets our adapter types with a bare ``KeyError('LOGGATE')``; these helpers check the
adapter's type before loading and turn that into an instruction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import safe_open

from .tuners import FAMILIES

OUR_PEFT_TYPES = frozenset(name for name, _, _ in FAMILIES)


class UnknownAdapterTypeError(RuntimeError):
    """The adapter's ``peft_type`` is not registered with PEFT in this process."""


class AdapterMismatchError(ValueError):
    """The adapter's tensors do not match the modules of the base model it is loaded onto."""


class AdapterFileError(ValueError):
    """An adapter folder (or Hub id) whose files are missing, unreadable or not safetensors."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class SavedAdapter:
    """An adapter as saved by ``save_pretrained``: its config (a dict) and its tensors, read with safetensors."""

    source: str
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def peft_type(self) -> str:
        return self.config.get("peft_type", "?")


def _adapter_paths(source: str) -> tuple[Path, Path]:
    path = Path(source)
    if path.is_dir():
        config, weights = path / CONFIG_NAME, path / SAFETENSORS_WEIGHTS_NAME
        if not config.is_file():
            raise AdapterFileError(f"{source}: no {CONFIG_NAME}, so this is not a PEFT adapter folder")
        if not weights.is_file():
            hint = "; only safetensors are read, re-save with safe_serialization=True" if (path / WEIGHTS_NAME).exists() else ""
            raise AdapterFileError(f"{source}: no {SAFETENSORS_WEIGHTS_NAME}{hint}")
        return config, weights
    if path.exists() or not HUB_ID.fullmatch(source):
        raise AdapterFileError(f"{source}: no such adapter folder (and not a Hub id of the form owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, CONFIG_NAME)), Path(hf_hub_download(source, SAFETENSORS_WEIGHTS_NAME))
    except Exception as error:  # network, auth or missing-file errors all mean the adapter cannot be read
        raise AdapterFileError(f"{source}: could not fetch the adapter from the Hub ({error})") from error


def _read_config(source: str, config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise AdapterFileError(f"{source}: {CONFIG_NAME} cannot be read as JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterFileError(f"{source}: {CONFIG_NAME} is not a JSON object")
    return config


def read_adapter_config(source: str | Path) -> dict:
    """The ``adapter_config.json`` of a saved adapter, checked like :func:`read_adapter_files` but without reading
    the weights (for questions about type or base model)."""
    source = str(source)
    return _read_config(source, _adapter_paths(source)[0])


def read_adapter_files(source: str | Path) -> SavedAdapter:
    """Config and tensors of a saved adapter (folder or Hub id), without a model; safetensors only."""
    source = str(source)
    config_path, weights_path = _adapter_paths(source)
    config = _read_config(source, config_path)
    try:
        with safe_open(weights_path, framework="pt") as saved:
            tensors = {key: saved.get_tensor(key) for key in saved.keys()}
    except Exception as error:  # safetensors raises several types for truncated or garbled files
        raise AdapterFileError(f"{source}: {weights_path.name} cannot be read, the file is corrupt or truncated "
                               f"({error})") from error
    return SavedAdapter(source, config, tensors)


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


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder (it exists, or starts with ``/``, ``.`` or ``~``)."""
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _check_local(name: str, what: str) -> None:
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"no {what} folder at {name} (and it is not a Hub id of the form owner/name)")


def load_base_model(
    name: str,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    device: Optional[str] = None,
):
    """A causal LM from a local folder or the Hub, in eval mode, optionally quantized by bitsandbytes (nf4 / int8).

    ``dtype`` is one of ``DTYPES``; 4-bit layers compute in it (``auto`` computes in fp32). ``device`` defaults to
    CUDA when available; remote code runs only with ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _check_local(name, "model")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of --load-in-4bit and --load-in-8bit")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "revision": revision, "trust_remote_code": trust_remote_code}
    if load_in_4bit or load_in_8bit:
        compute = torch.float32 if dtype == "auto" else DTYPES[dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs).to(device)
    return model.eval()


def load_tokenizer(name: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The tokenizer of ``name``; a missing pad token falls back to EOS (padding is masked by lengths anyway)."""
    from transformers import AutoTokenizer

    _check_local(name, "model")
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
