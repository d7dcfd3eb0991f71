from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...registration import add_peft_type
from ..modulated import ModulatedConfig

SELECTIONS = ("s_only", "wanda", "act_only", "cho_rej_min_std")


@dataclass
class ModulatedPissaConfig(ModulatedConfig):
    """Modulated PiSSA: ``y' = y + c · U_r((V_rᵀ x) ⊙ Δs)`` on ``r`` singular directions of the base weight.

    Equal to the seed's mutated-weight form ``W_res x + U_r diag(S_r + cΔs) V_rᵀ x`` with ``W_res = W - U_r S_r V_rᵀ``,
    but ``W`` is never touched. ``U_r, S_r, V_rᵀ`` are saved buffers, so a reload needs no SVD. Directions are chosen by
    ``selection`` with scores (``v_i`` the i-th right singular vector, ``x`` the layer input, moments from
    :func:`peft_ext.calibrate`): ``s_only`` σ_i; ``act_only`` sqrt(E[(v_iᵀx)²]); ``wanda`` σ_i·sqrt(E[(v_iᵀx)²]);
    ``cho_rej_min_std`` |E_cho[v_iᵀx] - E_rej[v_iᵀx]| / min(std_cho, std_rej).
    """

    r: Union[int, Literal["full"]] = field(
        default=16, metadata={"help": "Number of singular directions to train, or 'full' for all min(d_out, d_in)."}
    )
    selection: Literal["s_only", "wanda", "act_only", "cho_rej_min_std"] = field(
        default="s_only",
        metadata={"help": "How the r directions are chosen; every mode but s_only needs peft_ext.calibrate first."},
    )
    init_delta_s: float = field(default=0.0, metadata={"help": "Initial Δs (0: a fresh adapter is an exact no-op)."})
    quarantine: bool = field(
        default=False,
        metadata={"help": "Add a second zero-initialised knob Δs_hack summed with Δs in training; "
                  "peft_ext.drop_quarantine removes it for deployment."},
    )
    svd_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Directory caching SVDs, keyed by a hash of the weight bytes."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("MPISSA")
        if self.r != "full" and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"r={self.r!r}: use a positive integer or 'full'")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}: choose one of {SELECTIONS}")
