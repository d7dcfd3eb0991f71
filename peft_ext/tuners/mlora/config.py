from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...registration import add_peft_type
from ..modulated import ModulatedConfig


@dataclass
class ModulatedLoraConfig(ModulatedConfig):
    """Modulated LoRA: ``y' = y + c · (alpha / r) · B(A x)`` with a runtime coefficient ``c``.

    ``B = 0`` at init (a fresh adapter is an exact no-op) and ``A`` is Kaiming-uniform, as in LoRA; ``+c`` and ``-c``
    steer in opposite directions, ``c = 0`` is the base model with no adapter compute.
    """

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    init_b: Literal["zero", "random"] = field(
        default="zero",
        metadata={"help": "'zero': B = 0, an exact no-op at init (use this). 'random': B ~ N(0, 0.02) for tests."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("MLORA")
        if isinstance(self.r, bool) or int(self.r) != self.r or self.r < 1:
            raise ValueError(f"r={self.r!r}: must be a positive integer")
        if self.init_b not in ("zero", "random"):
            raise ValueError(f"init_b={self.init_b!r}: choose 'zero' or 'random'")
