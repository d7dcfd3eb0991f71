from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..modulated import ModulatedTuner
from .layer import HistoryBakeLayer, HistoryBakeLinear


class HistoryBakeModel(ModulatedTuner):
    """PEFT tuner for :class:`~peft_ext.HistoryBakeConfig`: targets exactly the module paths in ``config.ranks``."""

    prefix: str = "hbake_"
    tuner_layer_cls = HistoryBakeLayer
    layer_cls = HistoryBakeLinear

    def _check_target_module_exists(self, peft_config, key: str):
        return key in peft_config.ranks

    def layer_options(self, peft_config, key: str) -> dict[str, Any]:
        return {"rank": peft_config.ranks[key]}

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        modules = dict(model.named_modules())
        missing = [path for path in sorted(config.ranks) if not _is_linear(modules.get(path))]
        if missing:  # checked before anything is wrapped
            raise ValueError(
                f"this history bake does not fit the model: {len(missing)} of its {len(config.ranks)} baked modules are "
                f"not linear layers here (e.g. {missing[:3]}). It was baked for {config.base_model_name_or_path!r}; "
                "load it onto that model."
            )
        super().inject_adapter(model, adapter_name, **kwargs)
        config.target_modules = sorted(config.ranks)  # PEFT condenses long target lists into suffixes; keep the paths


def _is_linear(module) -> bool:
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(module, nn.Linear)
