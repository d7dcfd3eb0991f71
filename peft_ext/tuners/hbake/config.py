from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ...registration import add_peft_type


@dataclass
class HistoryBakeConfig(PeftConfig):
    """A history bake: kept adapters of earlier rounds folded into one frozen low-rank delta per module.

    ``y' = y + B (A x)`` with ``A`` (``rank x d_in``) and ``B`` (``d_out x rank``) saved buffers; every round's coefficient
    and scale is already folded into ``B``. Build one with :func:`peft_ext.bake`; load it with
    ``PeftModel.from_pretrained``. Nothing in it trains.
    """

    ranks: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Rank of the baked factors per module path (e.g. 'model.layers.0.self_attn.q_proj'). "
                  "The modules baked are exactly these keys."},
    )
    target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "The baked module paths (informative; set from `ranks`)."}
    )
    rounds: list[dict] = field(
        default_factory=list,
        metadata={"help": "Provenance of every kept round, oldest first: source, peft_type, coefficient, rank."},
    )
    compressed: bool = field(
        default=True, metadata={"help": "Whether the stacked factors were re-factored by QR + SVD of the core."}
    )
    max_rank: Optional[int] = field(default=None, metadata={"help": "Rank cap per module used when compressing."})
    energy: Optional[float] = field(
        default=None, metadata={"help": "Fraction of the squared singular values kept per module when compressing."}
    )
    relative_error: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per module: ||ΔW_baked - ΔW_exact||_F / ||ΔW_exact||_F caused by truncation (0 if none)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("HBAKE")
        bad = {path: rank for path, rank in self.ranks.items()
               if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1}
        if bad:
            raise ValueError(f"ranks must be positive integers; got {bad}")
        self.target_modules = sorted(self.ranks)
        self.inference_mode = True  # a bake has no trainable tensors
