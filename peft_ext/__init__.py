"""peft_ext: new adapter families for Hugging Face PEFT. Importing this package registers them (idempotent)."""

from .registration import ensure_registered

ensure_registered()

from .compose import compose_gates, plan_composition  # noqa: E402
from .loading import load_adapter_model  # noqa: E402
from .selection import select_gates  # noqa: E402
from .tuners.loggate import GateConfig, LogGateModel  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "GateConfig",
    "LogGateModel",
    "compose_gates",
    "ensure_registered",
    "load_adapter_model",
    "plan_composition",
    "select_gates",
]
