"""Invariants of the log-gate controller family (GateConfig / LogGateModel)."""

import json
import math

import pytest
import torch
from conftest import ARCHITECTURES, fresh
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from peft_ext import GateConfig, ModulatedLoraConfig, compose_gates, plan_composition, select_gates
from peft_ext.data import evaluate
from peft_ext.fit import fit
from peft_ext.tuners.loggate import LogGateLayer


def gate_layers(model):
    return [m for m in model.modules() if isinstance(m, LogGateLayer)]


def randomize(model, adapter="default", scale=1.0, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in gate_layers(model):
            raw = layer.loggate_raw[adapter]
            raw.copy_(torch.randn(raw.shape, generator=generator) * scale)


def base_params(model):
    return [(n, p) for n, p in model.named_parameters() if "loggate_" not in n]


# -- registration and config --------------------------------------------------------------------------------------
def test_registration_is_idempotent():
    import importlib

    import peft_ext
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    member = PeftType.LOGGATE
    importlib.import_module("peft_ext")
    peft_ext.ensure_registered()
    peft_ext.ensure_registered()
    assert PeftType.LOGGATE is member and PeftType("LOGGATE") is member
    assert list(PeftType).count(member) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is peft_ext.LogGateModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "loggate_"
    assert GateConfig().peft_type is member


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_gates": 0},
        {"num_gates": 2.5},
        {"max_log_gate": 0.0},
        {"max_log_gate": float("nan")},
        {"layers": "first:2"},
        {"layers": ["a"]},
        {"selection": "magic"},
        {"init": "ones"},
        {"layers": "last:2", "target_modules": ["model.layers.0"]},
    ],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        GateConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = GateConfig(num_gates=12, max_log_gate=0.1, layers=[0, 2], selection="per_layer")
    config.save_pretrained(tmp_path)
    loaded = GateConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LOGGATE"


@pytest.mark.parametrize("layers, expected", [("all", [0, 1, 2, 3]), ("last:2", [2, 3]), ([0, 2], [0, 2])])
def test_layers_pick_blocks(layers, expected):
    model = get_peft_model(fresh(), GateConfig(layers=layers))
    decoder = model.base_model.model.model.layers
    assert [i for i, block in enumerate(decoder) if isinstance(block, LogGateLayer)] == expected


def test_layers_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="last:9"):
        get_peft_model(fresh(), GateConfig(layers="last:9"))


# -- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_is_exact_identity(name, dtype, input_ids):
    reference = fresh(name, dtype)(input_ids).logits
    model = get_peft_model(fresh(name, dtype), GateConfig())
    assert all(layer.loggate_raw["default"].dtype == torch.float32 for layer in gate_layers(model))
    assert torch.equal(model(input_ids).logits, reference)


def test_bf16_gates_are_computed_in_fp32(input_ids):
    """s = 0.003: exp(s) rounds to exactly 1.0 in bf16, yet the gate must still move a bf16 model's outputs."""
    model = get_peft_model(fresh(dtype=torch.bfloat16), GateConfig())
    reference = model(input_ids).logits
    with torch.no_grad():
        for layer in gate_layers(model):
            layer.loggate_raw["default"].fill_(math.atanh(0.003 / 0.05))
    assert torch.exp(torch.tensor(0.003, dtype=torch.bfloat16)) == 1.0
    assert not torch.equal(model(input_ids).logits, reference)


def test_gates_stay_fp32_math_after_casting_the_model(input_ids):
    model = get_peft_model(fresh(), GateConfig())
    randomize(model, scale=0.1)
    model.to(torch.bfloat16)
    layer = gate_layers(model)[0]
    assert layer.loggate_raw["default"].dtype == torch.bfloat16
    assert layer.log_gate("default").dtype == torch.float32


def test_perturbing_gates_changes_logits_and_disable_restores_them(input_ids):
    reference = fresh()(input_ids).logits
    model = get_peft_model(fresh(), GateConfig())
    randomize(model, scale=0.5)
    assert not torch.allclose(model(input_ids).logits, reference)
    with model.disable_adapter():
        assert torch.equal(model(input_ids).logits, reference)
    assert not torch.allclose(model(input_ids).logits, reference)


def test_gate_math_matches_hand_computation(input_ids):
    """The last block's output equals exp(bound * tanh(raw)) * (un-gated output), computed independently."""
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.3))
    randomize(model)
    block = model.base_model.model.model.layers[-1]
    captured = {}
    block.base_layer.register_forward_hook(lambda m, i, o: captured.__setitem__("plain", o))
    block.register_forward_hook(lambda m, i, o: captured.__setitem__("gated", o))
    model(input_ids)
    raw = block.loggate_raw["default"].detach()
    expected = captured["plain"] * torch.exp(0.3 * torch.tanh(raw))
    assert torch.allclose(captured["gated"], expected, atol=0, rtol=1e-6)


# -- gradients and training ---------------------------------------------------------------------------------------
def test_base_parameters_get_no_gradient(batches):
    model = get_peft_model(fresh(), GateConfig())
    model.train()
    model(**batches[0]).loss.backward()
    assert all(not p.requires_grad and p.grad is None for _, p in base_params(model))
    assert all(layer.loggate_raw["default"].grad.abs().sum() > 0 for layer in gate_layers(model))


def test_training_lowers_completion_nll(batches):
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.5))
    before = evaluate(model, batches)["nll"]
    fit(model, batches, steps=20, lr=5e-2, progress=False)
    after = evaluate(model, batches)["nll"]
    assert after < before - 0.1, (before, after)


def test_sparse_budget_without_selection_refuses_to_train(batches):
    model = get_peft_model(fresh(), GateConfig(num_gates=10))
    model.train()
    with pytest.raises(RuntimeError, match="select_gates"):
        model(**batches[0])
    model.eval()  # inference on an unselected adapter is the identity, not an error
    assert torch.equal(model(**batches[0]).logits, fresh()(**batches[0]).logits)


def test_only_selected_gates_move(batches):
    model = get_peft_model(fresh(), GateConfig(num_gates=20, max_log_gate=0.5))
    select_gates(model, batches, progress=False)
    masks = [layer.loggate_mask["default"].clone() for layer in gate_layers(model)]
    assert sum(int(m.sum()) for m in masks) == 20
    fit(model, batches, steps=5, lr=5e-2, progress=False)
    for layer, mask in zip(gate_layers(model), masks):
        gate = layer.log_gate("default").detach()
        assert torch.equal(gate[~mask], torch.zeros_like(gate[~mask]))
    assert sum(int((layer.log_gate("default") != 0).sum()) for layer in gate_layers(model)) == 20


# -- selection ----------------------------------------------------------------------------------------------------
def reference_scores(batches, score_batches):
    """Σ_t g_t ⊙ h_t at every block output of the plain base model, via hooks (independent of the tuner)."""
    model = fresh()
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.model.layers]
    total = torch.zeros(len(model.model.layers), model.config.hidden_size)
    for batch in batches[:score_batches]:
        outputs.clear()
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, outputs)
        total += torch.stack([(g * h).sum(dim=(0, 1)) for g, h in zip(grads, outputs)]).detach()
    for hook in hooks:
        hook.remove()
    return total


def selected_mask(model):
    return torch.stack([layer.loggate_mask["default"] for layer in gate_layers(model)])


def test_gradient_selection_is_top_k_of_sum_g_times_h(batches):
    model = get_peft_model(fresh(), GateConfig(num_gates=30))
    report = select_gates(model, batches, score_batches=2, progress=False)
    scores = reference_scores(batches, 2)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.view(-1)[scores.abs().flatten().topk(30).indices] = True
    assert torch.equal(selected_mask(model), expected)
    assert report["score_batches"] == 2 and sum(report["gates_per_block"].values()) == 30


def test_per_layer_and_random_strategies(batches):
    per_layer = get_peft_model(fresh(), GateConfig(num_gates=10, selection="per_layer"))
    report = select_gates(per_layer, batches, progress=False)
    assert list(report["gates_per_block"].values()) == [3, 3, 2, 2]
    masks = []
    for seed in (0, 0, 1):
        model = get_peft_model(fresh(), GateConfig(num_gates=30))
        select_gates(model, strategy="random", seed=seed, progress=False)
        masks.append(selected_mask(model))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert int(masks[0].sum()) == 30


def test_selection_refuses_bad_requests(batches):
    model = get_peft_model(fresh(), GateConfig(num_gates=10))
    with pytest.raises(ValueError, match="must be in"):
        select_gates(model, batches, num_gates=10_000, progress=False)
    with pytest.raises(ValueError, match="needs batches"):
        select_gates(model, progress=False)
    select_gates(model, batches, progress=False)
    fit(model, batches, steps=2, lr=5e-2, progress=False)
    with pytest.raises(ValueError, match="non-zero gates"):
        select_gates(model, batches, progress=False)
    dense = get_peft_model(fresh(), GateConfig())
    with pytest.raises(ValueError, match="dense"):
        select_gates(dense, batches, progress=False)


# -- multiple adapters, save/load, delete, unload, merge -----------------------------------------------------------
def test_several_active_adapters_multiply_their_gates(input_ids):
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.2))
    model.add_adapter("other", GateConfig(max_log_gate=0.2))
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    model.base_model.set_adapter(["default", "other"])
    both = model(input_ids).logits
    plan = compose_gates(model, ["default", "other"], [1.0, 1.0], budget=1.0, adapter_name="sum")
    assert plan["clipped_fraction"] == 0 and plan["max_reconstruction_error"] < 1e-6
    model.base_model.set_adapter("sum")
    assert torch.allclose(model(input_ids).logits, both, atol=1e-5, rtol=0)


def test_save_and_reload_are_exact(tmp_path, batches, input_ids):
    model = get_peft_model(fresh(), GateConfig(num_gates=25, max_log_gate=0.3))
    select_gates(model, batches, progress=False)
    fit(model, batches, steps=5, lr=5e-2, progress=False)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOGGATE" and saved["num_gates"] == 25

    loaded = PeftModel.from_pretrained(fresh(), tmp_path / "a")
    assert torch.equal(loaded(input_ids).logits, expected)
    # a second adapter through load_adapter, and switching between them
    other = get_peft_model(fresh(), GateConfig(max_log_gate=0.3))
    randomize(other, scale=0.7)
    other_logits = other(input_ids).logits
    other.save_pretrained(tmp_path / "b")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(loaded(input_ids).logits, expected)
    loaded.set_adapter("b")
    assert torch.equal(loaded(input_ids).logits, other_logits)
    loaded.set_adapter("default")
    assert torch.equal(loaded(input_ids).logits, expected)


def test_delete_adapter_leaves_no_trace_on_gate_proj_model(input_ids):
    reference = fresh("tiny-llama")(input_ids).logits
    model = get_peft_model(fresh("tiny-llama"), GateConfig())
    assert any(name.endswith("mlp.gate_proj") for name, _ in model.named_modules())
    model.add_adapter("second", GateConfig())
    randomize(model, "default")
    randomize(model, "second")
    model.delete_adapter("second")
    keys = list(model.state_dict()) + [n for n, _ in model.named_modules()]
    assert not any(".second" in key for key in keys)
    assert all("second" not in layer.loggate_bound for layer in gate_layers(model))
    model.delete_adapter("default")
    assert all(not layer.loggate_raw and not layer.loggate_mask for layer in gate_layers(model))
    assert torch.equal(model.base_model.model(input_ids).logits, reference)


def test_unload_restores_the_plain_model(input_ids):
    reference = fresh()(input_ids).logits
    model = get_peft_model(fresh(), GateConfig())
    randomize(model)
    plain = model.unload()
    assert not gate_layers(plain) and not any("loggate" in name for name in plain.state_dict())
    assert torch.equal(plain(input_ids).logits, reference)


def test_merge_is_refused_and_leaves_model_intact(input_ids):
    model = get_peft_model(fresh(), GateConfig())
    randomize(model)
    before = model(input_ids).logits
    for call in (model.merge_and_unload, model.merge_adapter, lambda: gate_layers(model)[0].merge()):
        with pytest.raises(ValueError, match="not an edit of any weight"):
            call()
    assert len(gate_layers(model)) == 4 and torch.equal(model(input_ids).logits, before)


# -- generation, checkpointing, block outputs -----------------------------------------------------------------------
def test_kv_cache_generation_matches_full_forward(input_ids):
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.5))
    randomize(model)
    prompt = input_ids[:1, :6]
    with_cache = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    incremental = model(with_cache[:, :-1]).logits[:, -1]
    assert torch.equal(incremental.argmax(-1), with_cache[:, -1])


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(batches, use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(fresh(), GateConfig(max_log_gate=0.3))
        randomize(model, scale=0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        model(**batches[0]).loss.backward()
        grads.append(torch.cat([layer.loggate_raw["default"].grad for layer in gate_layers(model)]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class TupleBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden):
        return hidden + self.linear(hidden), "extra"


class TupleModel(nn.Module):
    def __init__(self, width=8, depth=3):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": width, "to_dict": lambda self: {}})()
        self.layers = nn.ModuleList(TupleBlock(width) for _ in range(depth))

    def forward(self, hidden):
        extras = []
        for block in self.layers:
            hidden, extra = block(hidden)
            extras.append(extra)
        return hidden, extras


def test_tuple_block_outputs_are_gated_and_passed_through():
    torch.manual_seed(0)
    model = TupleModel()
    x = torch.randn(2, 5, 8)
    reference, _ = model(x)
    peft_model = get_peft_model(model, GateConfig(max_log_gate=0.5))
    hidden, extras = peft_model(x)
    assert torch.equal(hidden, reference) and extras == ["extra"] * 3
    randomize(peft_model)
    assert not torch.allclose(peft_model(x)[0], reference)


# -- composition ----------------------------------------------------------------------------------------------------
def set_gates(model, adapter, values):
    """Write log-gates ``values`` ([blocks, hidden]) exactly representable under the adapter's bound."""
    with torch.no_grad():
        for layer, row in zip(gate_layers(model), values):
            bound = layer.loggate_bound[adapter]
            layer.loggate_raw[adapter].copy_(torch.atanh(row / bound))
            layer.loggate_mask[adapter].copy_(row != 0)


def test_composition_plan_and_result():
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.1))
    model.add_adapter("b", GateConfig(max_log_gate=0.1))
    a = torch.zeros(4, 64)
    b = torch.zeros(4, 64)
    a[0, :4] = torch.tensor([0.06, 0.06, -0.05, 0.02])
    b[0, :4] = torch.tensor([0.06, -0.03, 0.0, 0.0])
    b[1, 0] = 0.04
    set_gates(model, "default", a)
    set_gates(model, "b", b)
    plan = plan_composition(model, ["default", "b"], [1.0, 1.0], budget=0.1)
    # union = 5 gates; clipped: only 0.06 + 0.06 = 0.12 > 0.1; sign conflict: channel 1 (0.06 vs -0.03)
    assert plan["union_gates"] == 5
    assert plan["clipped_fraction"] == pytest.approx(1 / 5)
    assert plan["sign_conflicts"] == 1
    pair = plan["pairs"][0]
    assert pair["jaccard"] == pytest.approx(2 / 5)
    expected_cosine = float((a * b).sum() / (a.norm() * b.norm()))
    assert pair["cosine"] == pytest.approx(expected_cosine, rel=1e-5)
    assert plan["blocking"] == [] and len(plan["warnings"]) == 2

    result = compose_gates(model, ["default", "b"], [1.0, 1.0], budget=0.1, adapter_name="ab")
    assert model.active_adapters == ["default"]  # composing neither activates the result nor freezes the active one
    assert all(layer.loggate_raw["default"].requires_grad for layer in gate_layers(model))
    assert not any(layer.loggate_raw["ab"].requires_grad for layer in gate_layers(model))
    composed = torch.stack([layer.log_gate("ab").detach() for layer in gate_layers(model)])
    assert torch.allclose(composed, (a + b).clamp(-0.1, 0.1), atol=1e-7, rtol=0)
    assert torch.equal(selected_mask_of(model, "ab"), (a != 0) | (b != 0))
    assert result["max_reconstruction_error"] < 1e-7


def selected_mask_of(model, adapter):
    return torch.stack([layer.loggate_mask[adapter] for layer in gate_layers(model)])


def test_composition_refuses_blocking_plans_unless_forced():
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.1))
    set_gates(model, "default", torch.full((4, 64), 0.08))
    with pytest.raises(ValueError, match="composition refused"):
        compose_gates(model, ["default"], [2.0], budget=0.1, adapter_name="x")
    assert "x" not in model.peft_config
    plan = compose_gates(model, ["default"], [2.0], budget=0.1, adapter_name="x", force=True)
    assert plan["clipped_fraction"] == 1.0
    with pytest.raises(ValueError, match="unknown adapters"):
        plan_composition(model, ["nope"], [1.0])


@pytest.mark.parametrize("config", [GateConfig(num_gates=8), ModulatedLoraConfig(r=2)], ids=["gates", "mlora"])
def test_adapter_names_with_a_dot_are_refused_before_anything_changes(config):
    base = fresh()
    with torch.no_grad():
        expected = base(torch.arange(8)[None]).logits
    with pytest.raises(ValueError, match="'a.b' cannot be used.*'a_b'"):
        get_peft_model(base, config, adapter_name="a.b")
    with torch.no_grad():
        assert torch.equal(base(torch.arange(8)[None]).logits, expected)
    assert not any(isinstance(module, BaseTunerLayer) for module in base.modules())


def test_composition_refuses_a_dotted_name_and_leaves_the_config_alone():
    model = get_peft_model(fresh(), GateConfig(max_log_gate=0.1))
    with pytest.raises(ValueError, match="'w0.5' cannot be used"):
        compose_gates(model, ["default"], [0.5], adapter_name="w0.5")
    assert list(model.peft_config) == ["default"]
