from .config import ModulatedPissaConfig
from .layer import MPissaLayer, MPissaLinear
from .model import MPissaModel

__all__ = ["MPissaLayer", "MPissaLinear", "MPissaModel", "ModulatedPissaConfig"]
