"""Log-gates through the real loading paths: bitsandbytes, AutoPeftModel, HF Trainer, loaders without registration."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import load_base
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType

from peft_ext import GateConfig, load_adapter_model, select_gates
from peft_ext.fit import fit
from peft_ext.loading import AdapterMismatchError, UnknownAdapterTypeError
from peft_ext.tuners.loggate import LogGateLayer


def gate_layers(model):
    return [m for m in model.modules() if isinstance(m, LogGateLayer)]


@torch.no_grad()
def logits_no_grad(model, input_ids):
    return model(input_ids).logits


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "8bit"])
def test_bnb_forward_backward_save_reload(saved_models, batches, input_ids, tmp_path, quantization):
    import bitsandbytes as bnb

    base = load_base(saved_models, quantization=quantization)
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert any(isinstance(m, quantized) for m in base.modules())
    # bnb's CPU 4-bit matmul takes another kernel while autograd records, so exact comparisons use one grad mode
    reference = logits_no_grad(base, input_ids)

    model = get_peft_model(base, GateConfig(num_gates=32, max_log_gate=0.3))
    assert torch.equal(logits_no_grad(model, input_ids), reference)
    select_gates(model, batches, progress=False)
    model.train()
    model(**batches[0]).loss.backward()
    grads = [layer.loggate_raw["default"].grad for layer in gate_layers(model)]
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "loggate_" not in n)
    fit(model, batches, steps=3, lr=5e-2, progress=False)
    expected = logits_no_grad(model, input_ids)
    assert not torch.equal(expected, reference)
    with model.disable_adapter():
        assert torch.equal(logits_no_grad(model, input_ids), reference)
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(load_base(saved_models, quantization=quantization), tmp_path)
    assert torch.equal(logits_no_grad(reloaded, input_ids), expected)


def test_adapter_fitted_on_float_base_loads_on_4bit_base(saved_models, batches, input_ids, tmp_path):
    model = get_peft_model(load_base(saved_models), GateConfig(max_log_gate=0.3))
    fit(model, batches, steps=3, lr=5e-2, progress=False)
    model.save_pretrained(tmp_path)
    quantized = PeftModel.from_pretrained(load_base(saved_models, quantization="nf4"), tmp_path)
    for float_layer, quant_layer in zip(gate_layers(model), gate_layers(quantized)):
        assert torch.equal(float_layer.loggate_raw["default"], quant_layer.loggate_raw["default"])
    assert torch.isfinite(quantized(input_ids).logits).all()


def test_auto_peft_model_loads_from_a_local_base(saved_models, input_ids, tmp_path):
    base = load_base(saved_models, "tiny-qwen2")
    model = get_peft_model(base, GateConfig(max_log_gate=0.3))
    with torch.no_grad():
        for layer in gate_layers(model):
            layer.loggate_raw["default"].uniform_(-1, 1)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved_models["tiny-qwen2"])
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(auto(input_ids).logits, expected)


def test_hf_trainer_trains_and_saves_a_loadable_adapter(saved_models, batches, tmp_path, input_ids):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(load_base(saved_models), GateConfig(max_log_gate=0.5))
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    before = [layer.loggate_raw["default"].detach().clone() for layer in gate_layers(model)]
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 6
    after = [layer.loggate_raw["default"].detach() for layer in gate_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(saved_models), tmp_path / "adapter")
    assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_loader_explains_an_unregistered_type(saved_models, tmp_path, monkeypatch):
    model = get_peft_model(load_base(saved_models), GateConfig())
    model.save_pretrained(tmp_path)
    assert isinstance(load_adapter_model(load_base(saved_models), str(tmp_path)), PeftModel)
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.LOGGATE)
    with pytest.raises(UnknownAdapterTypeError, match="import peft_ext"):
        load_adapter_model(load_base(saved_models), str(tmp_path))


def test_loader_refuses_an_adapter_of_another_architecture(saved_models, tmp_path):
    get_peft_model(load_base(saved_models, "tiny-llama"), GateConfig()).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match="missing from the file"):  # 4 saved blocks, 6 in Qwen2
        load_adapter_model(load_base(saved_models, "tiny-qwen2"), str(tmp_path))


def test_plain_peft_without_import_fails_with_a_bare_key_error(saved_models, tmp_path):
    """Documents PEFT's behaviour that our loaders exist to explain (a fresh process that never imports peft_ext)."""
    model = get_peft_model(load_base(saved_models), GateConfig())
    model.save_pretrained(tmp_path)
    script = (
        "from peft import PeftModel; from transformers import AutoModelForCausalLM;"
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(saved_models['tiny-llama'])!r}),"
        f" {str(tmp_path)!r})"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "KeyError: 'LOGGATE'" in result.stderr
