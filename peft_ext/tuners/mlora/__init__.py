from .config import ModulatedLoraConfig
from .layer import MLoraLayer, MLoraLinear
from .model import MLoraModel

__all__ = ["MLoraLayer", "MLoraLinear", "MLoraModel", "ModulatedLoraConfig"]
