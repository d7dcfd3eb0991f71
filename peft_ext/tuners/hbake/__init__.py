from .config import HistoryBakeConfig
from .layer import HistoryBakeLayer, HistoryBakeLinear
from .model import HistoryBakeModel

__all__ = ["HistoryBakeConfig", "HistoryBakeLayer", "HistoryBakeLinear", "HistoryBakeModel"]
