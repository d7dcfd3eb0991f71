"""Training at scale: DDP and FSDP2 with 2 CPU processes (gloo), the ZeRO-3 gather path, checkpointing, compile."""

import json
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import fresh, load_base
from peft import get_peft_model, prepare_model_for_kbit_training

from peft_ext import GateConfig, ModulatedLoraConfig, ModulatedPissaConfig
from peft_ext.provenance import fingerprint

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
FAMILIES = {
    "gate": lambda: GateConfig(init="random", max_log_gate=0.3),
    "mlora": lambda: ModulatedLoraConfig(r=4, init_b="random"),
    "mpissa": lambda: ModulatedPissaConfig(r=4, init_delta_s=0.2),
}


def launch(tmp_path, port, *args):
    """``torchrun --nproc_per_node=2 benchmarks/ddp_train.py ...``: the README's command; returns both ranks' reports."""
    command = [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={port}", str(ROOT / "benchmarks" / "ddp_train.py"),
               "--out", str(tmp_path), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("family, port", [("gate", 29611), ("mlora", 29612), ("mpissa", 29613)])
def test_ddp_two_processes_stay_in_sync_and_save_a_reloadable_adapter(family, port, tmp_path):
    first, second = launch(tmp_path, port, "--family", family, "--check-reduction")
    assert first["world_size"] == 2 and first["mode"] == "ddp"
    # the same gates / PiSSA directions on both ranks, chosen from different data shards
    assert first["selected_digest"] == second["selected_digest"]
    if family != "mlora":
        assert first["local_digest"] != second["local_digest"]  # each shard alone would have chosen differently
    assert first["max_rank_difference"] == 0.0 == second["max_rank_difference"]  # gradients were all-reduced
    assert first["losses"] != second["losses"]  # ... while each rank saw its own data
    assert first["reload_equal"] and second["reload_equal"]  # rank 0's file reloads to the trained model, bit for bit
    assert first["losses"][-1] < first["losses"][0]


@pytest.mark.slow
def test_fsdp2_fully_shard_trains_and_saves_the_full_adapter(tmp_path):
    first, second = launch(tmp_path, 29614, "--family", "mlora", "--fsdp")
    assert first["mode"] == "fsdp2" and first["selected_digest"] == second["selected_digest"]
    assert first["reload_equal"] and second["reload_equal"]
    assert first["losses"][-1] < first["losses"][0]


@contextmanager
def zero3_stand_in(model):
    """Partition every parameter as DeepSpeed ZeRO-3 does (empty data, ``ds_shape``), and a GatheredParameters that
    restores the full data only inside its context. Reading a weight outside the context sees an empty tensor."""
    import peft.utils.integrations as integrations

    full = {}
    for param in model.parameters():
        full[param] = param.data
        param.ds_shape = param.data.shape
        param.data = torch.empty(0, dtype=param.dtype)
    gathered_calls = []

    @contextmanager
    def gathered_parameters(params, modifier_rank=None, fwd_module=None):
        params = [params] if isinstance(params, torch.nn.Parameter) else list(params)
        gathered_calls.append(len(params))
        for param in params:
            param.data = full[param]
        try:
            yield
        finally:
            for param in params:
                param.data = torch.empty(0, dtype=param.dtype)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    saved_module, saved_check = sys.modules.get("deepspeed"), integrations.check_deepspeed_zero3_enabled
    sys.modules["deepspeed"] = fake
    integrations.check_deepspeed_zero3_enabled = lambda: True
    try:
        yield gathered_calls
    finally:
        integrations.check_deepspeed_zero3_enabled = saved_check
        if saved_module is None:
            del sys.modules["deepspeed"]
        else:
            sys.modules["deepspeed"] = saved_module
        for param, data in full.items():
            param.data = data
            del param.ds_shape


def test_zero3_partitioned_weights_are_gathered_for_the_pissa_svd_and_the_fingerprint():
    reference = get_peft_model(fresh(), ModulatedPissaConfig(r=4, selection="s_only", target_modules=["q_proj"]))
    reference(torch.randint(4, 100, (1, 6)))  # runs the SVD
    expected_fingerprint = fingerprint(fresh())
    model = fresh()
    with zero3_stand_in(model) as gathered:
        assert fingerprint(model) == expected_fingerprint and gathered
        pissa = get_peft_model(model, ModulatedPissaConfig(r=4, selection="s_only", target_modules=["q_proj"]))
        for module in pissa.modules():
            if hasattr(module, "mpissa_pending") and module.mpissa_pending:
                module.choose_directions("default")  # what the first forward does: SVD of the gathered weight
    key = "base_model.model.model.layers.0.self_attn.q_proj.mpissa_vt.default"
    assert torch.equal(pissa.state_dict()[key], reference.state_dict()[key])


def gradients(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant, batches):
    torch.manual_seed(0)
    plain = get_peft_model(fresh(), FAMILIES[family]())
    plain.train()
    expected = gradients(plain, batches[0])
    torch.manual_seed(0)
    checkpointed = get_peft_model(fresh(), FAMILIES[family]())
    checkpointed.train()
    checkpointed.enable_input_require_grads()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert checkpointed.base_model.model.is_gradient_checkpointing
    got = gradients(checkpointed, batches[0])
    assert got.keys() == expected.keys() and expected
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing_on_a_4bit_base_after_prepare_model_for_kbit_training(family, saved_models, batches):
    def prepared(checkpointing):
        base = prepare_model_for_kbit_training(load_base(saved_models, quantization="nf4"),
                                               use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = get_peft_model(base, FAMILIES[family]())
        model.train()
        return model

    expected = gradients(prepared(False), batches[0])
    got = gradients(prepared(True), batches[0])
    assert expected and all(torch.isfinite(g).all() for g in got.values())
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_compile_matches_eager(family, batches):
    torch.manual_seed(0)
    model = get_peft_model(fresh(), FAMILIES[family]())
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        eager = model(ids).logits
    compiled = torch.compile(model)  # inductor
    with torch.no_grad():
        out = compiled(ids).logits
    assert torch.allclose(out, eager, atol=1e-5, rtol=0), float((out - eager).abs().max())
    model.train()
    expected = gradients(model, batches[0])
    got = gradients(torch.compile(model, backend="aot_eager"), batches[0])  # the compiled backward
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name
    torch._dynamo.reset()
