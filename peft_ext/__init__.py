"""peft_ext: new adapter families for Hugging Face PEFT. Importing this package registers them (idempotent)."""

from .registration import ensure_registered

ensure_registered()

from .bake import RoundError, add_round, bake, reference  # noqa: E402
from .compose import compose_gates, plan_composition  # noqa: E402
from .loading import load_adapter_model  # noqa: E402
from .pissa import calibrate, drop_quarantine  # noqa: E402
from .selection import select_gates  # noqa: E402
from .tuners.hbake import HistoryBakeConfig, HistoryBakeModel  # noqa: E402
from .tuners.loggate import GateConfig, LogGateModel  # noqa: E402
from .tuners.mlora import MLoraModel, ModulatedLoraConfig  # noqa: E402
from .tuners.modulated import coefficient, get_coefficient, set_coefficient  # noqa: E402
from .tuners.mpissa import ModulatedPissaConfig, MPissaModel  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "GateConfig",
    "HistoryBakeConfig",
    "HistoryBakeModel",
    "LogGateModel",
    "MLoraModel",
    "MPissaModel",
    "ModulatedLoraConfig",
    "ModulatedPissaConfig",
    "RoundError",
    "add_round",
    "bake",
    "calibrate",
    "coefficient",
    "compose_gates",
    "drop_quarantine",
    "ensure_registered",
    "get_coefficient",
    "load_adapter_model",
    "plan_composition",
    "reference",
    "select_gates",
    "set_coefficient",
]
