from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...registration import add_peft_type
from ..common import validate_layers_spec

SELECTION_STRATEGIES = ("gradient", "per_layer", "random")
INIT_MODES = ("zero", "random")


@dataclass
class GateConfig(PeftConfig):
    """Configuration of a log-gate controller: ``h' = exp(s) ⊙ h`` on decoder-block outputs.

    One signed log-gate ``s = max_log_gate · tanh(raw)`` per (block, channel), shared by all token positions. With
    ``num_gates=None`` every (block, channel) gate is trainable; with an integer budget only the gates chosen by
    :func:`peft_ext.select_gates` (a persistent mask) can leave zero, and training before selection is an error.
    """

    num_gates: Optional[int] = field(
        default=None,
        metadata={
            "help": "None: every (block, channel) gate is trainable (dense). An int: sparse budget over all targeted "
            "blocks, chosen by peft_ext.select_gates before training."
        },
    )
    max_log_gate: float = field(
        default=0.05,
        metadata={"help": "Bound on each log-gate: s = max_log_gate * tanh(raw), so exp(s) is in [e^-b, e^b]."},
    )
    layers: Union[str, list[int]] = field(
        default="all",
        metadata={"help": "Which decoder blocks carry gates: 'all', 'last:N' or a list of block indices."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Override of the auto-detected decoder blocks: module names (exact or suffix) or a regex; the "
            "modules' outputs (tensor or tuple whose first element is the hidden state) are gated. Use with layers='all'."
        },
    )
    selection: Literal["gradient", "per_layer", "random"] = field(
        default="gradient",
        metadata={
            "help": "Default strategy of select_gates: 'gradient' (global top-k of |dL/ds| at s=0), 'per_layer' "
            "(top-k with an equal quota per block) or 'random' (uniform; the control every report needs)."
        },
    )
    score_batches: int = field(
        default=16, metadata={"help": "Batches of training data over which select_gates accumulates dL/ds."}
    )
    selection_seed: int = field(default=0, metadata={"help": "Seed of the 'random' selection strategy."})
    init: Literal["zero", "random"] = field(
        default="zero",
        metadata={
            "help": "'zero': raw = 0, an exact identity (use this). 'random': raw ~ U(-1, 1) on the selectable gates, "
            "for tests that need a non-identity adapter."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save in full (PEFT semantics)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("LOGGATE")
        if self.num_gates is not None and (isinstance(self.num_gates, bool) or int(self.num_gates) != self.num_gates
                                           or self.num_gates <= 0):
            raise ValueError(f"num_gates={self.num_gates!r}: use None (dense) or a positive integer budget")
        if not (math.isfinite(self.max_log_gate) and self.max_log_gate > 0):
            raise ValueError(f"max_log_gate={self.max_log_gate!r}: must be a finite positive number")
        validate_layers_spec(self.layers)
        if self.target_modules is not None and self.layers != "all":
            raise ValueError("pass either `layers` (auto-detected decoder blocks) or `target_modules`, not both")
        if self.selection not in SELECTION_STRATEGIES:
            raise ValueError(f"selection={self.selection!r}: choose one of {SELECTION_STRATEGIES}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init={self.init!r}: choose one of {INIT_MODES}")
        if self.score_batches < 1:
            raise ValueError(f"score_batches={self.score_batches}: must be >= 1")
