from __future__ import annotations

from ..modulated import ModulatedTuner
from .layer import MPissaLayer, MPissaLinear


class MPissaModel(ModulatedTuner):
    """PEFT tuner for :class:`~peft_ext.ModulatedPissaConfig`; base weights are never mutated."""

    prefix: str = "mpissa_"
    tuner_layer_cls = MPissaLayer
    layer_cls = MPissaLinear
