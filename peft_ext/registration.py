"""Register peft_ext's adapter families with PEFT.

PEFT's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` str-Enum, so each
family first gets a member through :func:`add_peft_type` (stdlib only, a no-op when the member exists). The prefix of a
family is ``value.lower() + "_"``; it must never be a substring of a base-model module path, because PEFT's
``delete_adapter`` skips every module whose path contains it (``gate_`` would silently skip every ``gate_proj``).
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

# Module names that occur in Hugging Face decoder models; a family prefix must not occur inside any of them.
_COMMON_MODULE_NAMES = (
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
    "out_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2",
    "lm_head", "embed_tokens", "self_attn", "input_layernorm", "post_attention_layernorm", "shared_expert_gate",
)


def add_peft_type(name: str, enum_cls: type[enum.Enum] = PeftType) -> enum.Enum:
    """Return ``enum_cls[name]``, adding the member ``name = "name"`` first if it does not exist (idempotent)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to touch member names
    return member


def register_family(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Add ``name`` to ``PeftType`` and register the family with PEFT; re-registering the same classes is a no-op."""
    peft_type = add_peft_type(name)
    prefix = name.lower() + "_"
    if model_cls.prefix != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_cls.prefix!r}, expected {prefix!r}")
    clashes = [module_name for module_name in _COMMON_MODULE_NAMES if prefix in module_name]
    if clashes:
        raise ValueError(f"prefix {prefix!r} occurs in module names {clashes}; PEFT's delete_adapter would skip them")
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # already registered (e.g. after importlib.reload): point PEFT at the classes given now
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    else:
        register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls)
    return peft_type


def ensure_registered() -> None:
    """Register every family (importing :mod:`peft_ext` already does this)."""
    from .tuners import FAMILIES

    for name, config_cls, model_cls in FAMILIES:
        register_family(name, config_cls, model_cls)
