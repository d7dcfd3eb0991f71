"""One folder per adapter family; ``FAMILIES`` lists ``(PeftType name, config class, tuner class)`` for registration."""

from .loggate import GateConfig, LogGateModel

FAMILIES = [
    ("LOGGATE", GateConfig, LogGateModel),
]
