from .config import GateConfig
from .layer import LogGateBlock, LogGateLayer
from .model import LogGateModel

__all__ = ["GateConfig", "LogGateBlock", "LogGateLayer", "LogGateModel"]
