"""One folder per adapter family; ``FAMILIES`` lists ``(PeftType name, config class, tuner class)`` for registration."""

from .hbake import HistoryBakeConfig, HistoryBakeModel
from .loggate import GateConfig, LogGateModel
from .mlora import MLoraModel, ModulatedLoraConfig
from .mpissa import ModulatedPissaConfig, MPissaModel

FAMILIES = [
    ("LOGGATE", GateConfig, LogGateModel),
    ("MLORA", ModulatedLoraConfig, MLoraModel),
    ("MPISSA", ModulatedPissaConfig, MPissaModel),
    ("HBAKE", HistoryBakeConfig, HistoryBakeModel),
]
