from __future__ import annotations

from ..modulated import ModulatedTuner
from .layer import MLoraLayer, MLoraLinear


class MLoraModel(ModulatedTuner):
    """PEFT tuner for :class:`~peft_ext.ModulatedLoraConfig`; merging happens at the current coefficient."""

    prefix: str = "mlora_"
    tuner_layer_cls = MLoraLayer
    layer_cls = MLoraLinear
