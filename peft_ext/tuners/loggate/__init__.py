from .config import GateConfig
from .layer import LogGateBlock, LogGateLayer
from .model import LogGateModel, as_gate_tuner, resolve_adapter

__all__ = ["GateConfig", "LogGateBlock", "LogGateLayer", "LogGateModel", "as_gate_tuner", "resolve_adapter"]
