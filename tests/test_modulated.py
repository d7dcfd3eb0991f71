"""Invariants of the modulated LoRA and modulated PiSSA families (runtime coefficient c)."""

import pytest
import torch
from conftest import OneLinear, fresh, load_base
from peft import PeftModel, get_peft_model

from peft_ext import (
    ModulatedLoraConfig,
    ModulatedPissaConfig,
    calibrate,
    coefficient,
    drop_quarantine,
    get_coefficient,
    set_coefficient,
)
from peft_ext.data import evaluate
from peft_ext.fit import fit
from peft_ext.tuners.modulated import ModulatedLayer
from peft_ext.tuners.mpissa import MPissaLayer

FAMILIES = {"mlora": ModulatedLoraConfig, "mpissa": ModulatedPissaConfig}


def make_config(family, **kwargs):
    return FAMILIES[family](r=4, **kwargs)


def layers(model):
    return [m for m in model.modules() if isinstance(m, ModulatedLayer)]


def perturb(model, adapter="default", scale=0.1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith(f".{adapter}")) and ("mlora_" in name or "mpissa_" in name):
                p.add_(torch.randn(p.shape, generator=generator) * scale)


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


# -- identity ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_and_c_zero_are_exact_identity(family, dtype, input_ids):
    reference = logits(fresh(dtype=dtype), input_ids)
    model = get_peft_model(fresh(dtype=dtype), make_config(family))
    assert torch.equal(logits(model, input_ids), reference)
    perturb(model)
    assert not torch.equal(logits(model, input_ids), reference)
    with coefficient(model, 0.0):
        assert torch.equal(logits(model, input_ids), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), reference)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quantization", ["nf4", "8bit"])
def test_bnb_identity_backward_save_reload(family, quantization, saved_models, batches, input_ids, tmp_path):
    base = load_base(saved_models, quantization=quantization)
    reference = logits(base, input_ids)
    model = get_peft_model(base, make_config(family))
    assert torch.equal(logits(model, input_ids), reference)
    model.train()
    model(**batches[0]).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(float(p.grad.abs().sum()) > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()  # bnb 8-bit takes another path in train mode; the reference was taken in eval mode
    perturb(model)
    with coefficient(model, 0.0):
        assert torch.equal(logits(model, input_ids), reference)
    expected = logits(model, input_ids)
    assert not torch.equal(expected, reference)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_base(saved_models, quantization=quantization), tmp_path)
    assert torch.equal(logits(reloaded, input_ids), expected)


# -- the coefficient --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_single_linear_is_antisymmetric_and_linear_in_c(family):
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), make_config(family, target_modules=["lin"]))
    perturb(model, scale=0.5)
    x = torch.randn(5, 16)

    def out(c):
        with coefficient(model, c), torch.no_grad():
            return model(x)

    y0 = out(0.0)
    plus, minus, double = out(0.7) - y0, out(-0.7) - y0, out(1.4) - y0
    assert plus.abs().max() > 1e-3
    assert torch.allclose(plus, -minus, atol=1e-6, rtol=0)
    assert torch.allclose(double, 2 * plus, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_plus_and_minus_c_in_one_step_give_the_summed_gradients(family, batches):
    model = get_peft_model(fresh(), make_config(family))
    perturb(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(*cs):
        loss = 0
        for c in cs:
            with coefficient(model, c):
                loss = loss + model(**batches[0]).loss
        return torch.autograd.grad(loss, params)

    both = grads(1.5, -1.5)
    separate = [a + b for a, b in zip(grads(1.5), grads(-1.5))]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(both, separate))
    assert any(float((a - b).abs().max()) > 1e-4 for a, b in zip(grads(1.5), grads(-1.5)))


def test_coefficient_context_nests_and_restores_on_errors(batches):
    model = get_peft_model(fresh(), make_config("mlora", coefficient=1.25))
    assert get_coefficient(model) == 1.25
    with coefficient(model, 0.5):
        with coefficient(model, -2.0):
            assert get_coefficient(model) == -2.0
        assert get_coefficient(model) == 0.5
    with pytest.raises(ZeroDivisionError):
        with coefficient(model, 3.0):
            1 / 0
    assert get_coefficient(model) == 1.25
    set_coefficient(model, 0.75)
    assert all(layer.coefficients["default"] == 0.75 for layer in layers(model))
    with pytest.raises(ValueError, match="finite"):
        set_coefficient(model, float("inf"))
    with pytest.raises(ValueError, match="unknown adapters"):
        set_coefficient(model, 1.0, adapter_name="nope")


# -- PiSSA specifics --------------------------------------------------------------------------------------------------
def test_pissa_equals_the_seed_mutated_weight_formulation():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), ModulatedPissaConfig(r=5, target_modules=["lin"]))
    x = torch.randn(7, 16)
    model(x)  # first forward runs the SVD
    layer = layers(model)[0]
    with torch.no_grad():
        layer.mpissa_delta_s["default"].copy_(torch.randn(5))
    c = 0.8
    w = layer.base_layer.weight.detach()
    u, s, vt = layer.mpissa_u["default"], layer.mpissa_s["default"], layer.mpissa_vt["default"]
    delta_s = layer.mpissa_delta_s["default"].detach()
    w_res = w - u @ torch.diag(s) @ vt
    reference = x @ w_res.T + x @ (u @ torch.diag(s + c * delta_s) @ vt).T + layer.base_layer.bias
    with coefficient(model, c), torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5, rtol=0)
    assert torch.equal(layer.base_layer.weight, w)  # W is never mutated


def spectrum_case(d=16):
    """A weight with known singular vectors and inputs whose energy sits on chosen directions."""
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    singular = torch.linspace(10, 1, d)
    weight = u @ torch.diag(singular) @ v.T
    energy = torch.full((d,), 0.1)
    energy[12:16] = 5.0  # most input energy on the smallest singular directions
    energy[4:8] = 2.0
    signs = torch.tensor([1.0, -1.0]).repeat(50)
    coords = signs[:, None] * energy[None, :]  # E[p] = 0, E[p²] = energy²
    return weight, v, singular, energy, coords


def chosen_directions(model):
    layer = layers(model)[0]
    return layer, layer.mpissa_vt["default"]


def test_selection_modes_choose_the_directions_their_scores_say(tmp_path):
    weight, v, singular, energy, coords = spectrum_case()
    chosen_batch = [{"input_ids": (coords @ v.T)[None], "attention_mask": torch.ones(1, coords.shape[0])}]
    picked = {}
    for selection in ("s_only", "act_only", "wanda"):
        model = get_peft_model(OneLinear(16, 16, weight), ModulatedPissaConfig(r=4, selection=selection,
                                                                               target_modules=["lin"]))
        report = calibrate(model, chosen_batch, progress=False)
        layer, vt = chosen_directions(model)
        # which of the known right singular vectors were kept (|cos| ~ 1)
        picked[selection] = sorted(int(i) for i in (vt @ v).abs().argmax(dim=1))
        assert report["selection"] == selection and 0 <= report["tail_fraction"] <= 1
    expected_wanda = sorted((singular * energy).topk(4).indices.tolist())
    assert picked == {"s_only": [0, 1, 2, 3], "act_only": [12, 13, 14, 15], "wanda": expected_wanda}
    assert expected_wanda != picked["s_only"] and expected_wanda != picked["act_only"]

    # cho_rej_min_std: chosen and rejected inputs differ only along v_9, with a small spread there
    base_coords = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    shift = torch.zeros(16)
    shift[9] = 3.0
    cho = base_coords.clone()
    rej = base_coords.clone()
    cho[:, 9] = cho[:, 9] * 0.1 + shift[9]
    rej[:, 9] = rej[:, 9] * 0.1 - shift[9]
    batch = lambda c: [{"input_ids": (c @ v.T)[None], "attention_mask": torch.ones(1, 100)}]  # noqa: E731
    model = get_peft_model(OneLinear(16, 16, weight), ModulatedPissaConfig(r=1, selection="cho_rej_min_std",
                                                                           target_modules=["lin"]))
    with pytest.raises(ValueError, match="rejected"):
        calibrate(model, batch(cho), progress=False)
    report = calibrate(model, batch(cho), batch(rej), progress=False)
    _, vt = chosen_directions(model)
    assert int((vt @ v).abs().argmax()) == 9
    assert report["targets"]["lin"]["mean_rank"] == 9.0 and report["tail_fraction"] == 1.0


def test_activation_selection_without_calibration_raises(input_ids, batches, tmp_path):
    model = get_peft_model(fresh(), ModulatedPissaConfig(r=4, selection="wanda"))
    with pytest.raises(RuntimeError, match="calibrate"):
        model(input_ids)
    with coefficient(model, 0.0):  # c = 0 needs no directions
        model(input_ids)
    calibrate(model, batches, progress=False)
    with pytest.raises(ValueError, match="no directions left"):
        calibrate(model, batches, progress=False)
    assert torch.equal(logits(model, input_ids), logits(fresh(), input_ids))
    perturb(model)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path)  # calibrated directions come with the file
    assert torch.equal(logits(reloaded, input_ids), expected)


def test_pissa_reload_and_cache_need_no_second_svd(tmp_path, input_ids, monkeypatch):
    config = ModulatedPissaConfig(r="full", svd_cache_dir=str(tmp_path / "cache"))
    model = get_peft_model(fresh(), config)
    perturb(model)
    expected = logits(model, input_ids)
    assert len(list((tmp_path / "cache").glob("svd-*.safetensors"))) == 28  # 4 blocks x 7 linears
    assert not list((tmp_path / "cache").glob("*.tmp"))
    model.save_pretrained(tmp_path / "adapter")

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD ran")

    import peft_ext.tuners.mpissa.layer as mpissa_layer

    with monkeypatch.context() as patch:
        patch.setattr(mpissa_layer, "svd", no_svd)  # neither computed nor read from the cache
        reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "adapter")
        assert not any(layer.mpissa_pending for layer in layers(reloaded))
        assert torch.equal(logits(reloaded, input_ids), expected)
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    cached = get_peft_model(fresh(), config)  # cache hit: same directions, no SVD
    cached(input_ids)
    for a, b in zip(layers(model), layers(cached)):
        assert torch.equal(a.mpissa_vt["default"], b.mpissa_vt["default"])


def test_quarantine_knob_trains_and_is_dropped_for_deployment(input_ids, batches):
    model = get_peft_model(fresh(), ModulatedPissaConfig(r=4, quarantine=True))
    model(input_ids)
    layer = [m for m in layers(model) if isinstance(m, MPissaLayer)][0]
    assert layer.mpissa_delta_s_hack["default"].requires_grad
    with torch.no_grad():
        for m in layers(model):
            m.mpissa_delta_s["default"].fill_(0.3)
            m.mpissa_delta_s_hack["default"].fill_(0.5)
    with_hack = logits(model, input_ids)
    assert drop_quarantine(model) == 28
    without = logits(model, input_ids)
    assert not torch.equal(with_hack, without)
    reference = get_peft_model(fresh(), ModulatedPissaConfig(r=4))
    reference(input_ids)
    with torch.no_grad():
        for m in layers(reference):
            m.mpissa_delta_s["default"].fill_(0.3)
    assert torch.allclose(logits(reference, input_ids), without, atol=1e-6)
    assert model.peft_config["default"].quarantine is False


# -- PEFT plumbing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_after_set_coefficient(family, tmp_path, input_ids):
    model = get_peft_model(fresh(), make_config(family, coefficient=1.0))
    perturb(model)
    at_one = logits(model, input_ids)
    set_coefficient(model, 0.5)
    at_half = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path)
    assert get_coefficient(reloaded) == 1.0  # the coefficient is not saved; the config's default applies
    assert torch.equal(logits(reloaded, input_ids), at_one)
    set_coefficient(reloaded, 0.5)
    assert torch.equal(logits(reloaded, input_ids), at_half)


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_adapters_delete_and_base_gradients(family, input_ids, batches):
    reference = logits(fresh(), input_ids)
    model = get_peft_model(fresh(), make_config(family))
    model.add_adapter("other", make_config(family))
    perturb(model, "default", seed=1)
    perturb(model, "other", seed=2)
    default_out = logits(model, input_ids)
    model.set_adapter("other")
    other_out = logits(model, input_ids)
    assert not torch.equal(default_out, other_out)
    model.train()
    model(**batches[0]).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".other" not in n)
    model.delete_adapter("other")
    prefix = "mlora_" if family == "mlora" else "mpissa_"
    assert not any(".other" in key for key in model.state_dict())
    assert all("other" not in layer.coefficients for layer in layers(model))
    model.set_adapter("default")
    assert torch.equal(logits(model, input_ids), default_out)
    model.delete_adapter("default")
    assert torch.equal(logits(model.base_model.model, input_ids), reference)
    assert not any(prefix in key for key in model.base_model.model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_lower_the_loss(family, batches):
    model = get_peft_model(fresh(), FAMILIES[family](r=8 if family == "mlora" else "full"))
    before = evaluate(model, batches)["nll"]
    fit(model, batches, steps=15, lr=2e-2, progress=False)
    assert evaluate(model, batches)["nll"] < before - 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_at_current_coefficient(family, input_ids):
    model = get_peft_model(fresh(), make_config(family))
    perturb(model, scale=0.3)
    set_coefficient(model, -0.7)
    expected = logits(model, input_ids)
    model.merge_adapter()
    assert torch.allclose(logits(model, input_ids), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge first"):
        set_coefficient(model, 1.0)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, input_ids), expected, atol=1e-5)
    plain = model.merge_and_unload()
    assert not layers(plain)
    assert torch.allclose(logits(plain, input_ids), expected, atol=1e-5)


def repack_like_bnb_cpu(model):
    """Repack every 4-bit weight as bitsandbytes' ``Linear4bit.forward`` does on its first no-grad CPU forward.

    bitsandbytes only does it on CPUs with AVX512-BF16; doing it here by hand (with bitsandbytes' own function) makes
    the tests of what follows independent of the machine. Only merges and dequantisation run afterwards, no forward.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def test_merge_on_a_4bit_base_adds_the_delta_after_bnb_cpu_repacking(saved_models, input_ids):
    """bnb repacks 4-bit weights for its CPU kernel on the first no-grad forward, after which a plain dequantisation
    misreads them; the merge must still requantise dequant(W) + c·delta, up to nf4 rounding."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    from peft_ext.tuners.common import dequantized_weight

    model = get_peft_model(load_base(saved_models, quantization="nf4"), ModulatedLoraConfig(r=4, alpha=8))
    perturb(model, scale=0.05)
    set_coefficient(model, -0.5)
    logits(model, input_ids)  # repacks the base weights on a CPU with AVX512-BF16
    repack_like_bnb_cpu(model)  # and by hand on any other machine, so the path is tested everywhere
    layer = layers(model)[0]
    packed = layer.get_base_layer().weight
    assert getattr(packed.quant_state, "packing_format_for_cpu", False)
    target = dequantized_weight(layer) + layer.delta_weight("default") * -0.5
    naive_error = float((dequantize_bnb_weight(packed, packed.quant_state) - dequantized_weight(layer)).abs().max())
    name = [n for n, m in model.base_model.model.named_modules() if m is layer][0]
    plain = model.merge_and_unload()
    merged = plain.get_submodule(name)
    assert isinstance(merged, bnb.nn.Linear4bit)
    merged_weight = dequantize_bnb_weight(merged.weight, merged.weight.quant_state)
    relative = float((merged_weight - target).norm() / target.norm())
    assert relative < 0.15, relative  # nf4 rounding of the merged weight
    assert naive_error > 10 * float((merged_weight - target).abs().mean()), naive_error


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_on_an_8bit_base_requantizes(family, saved_models, input_ids):
    base_logits = logits(load_base(saved_models, quantization="8bit"), input_ids)
    model = get_peft_model(load_base(saved_models, quantization="8bit"), make_config(family))
    perturb(model, scale=0.05)
    set_coefficient(model, 0.5)
    expected = logits(model, input_ids)
    plain = model.merge_and_unload()
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in plain.modules()) and not layers(plain)
    merge_error = float((logits(plain, input_ids) - expected).abs().max())
    assert merge_error < 0.25 * float((expected - base_logits).abs().max()), merge_error


def test_layer_range_targets_the_middle_half():
    model = get_peft_model(fresh(), ModulatedLoraConfig(r=2, layer_range=(0.25, 0.75)))
    blocks = {name.split(".")[4] for name, m in model.named_modules() if isinstance(m, ModulatedLayer)}
    assert blocks == {"1", "2"}
    assert not any("lm_head" in name for name, m in model.named_modules() if isinstance(m, ModulatedLayer))
    with pytest.raises(ValueError, match=r"layer_range=\(0.9, 0.95\) selects no block"):
        get_peft_model(fresh(), ModulatedLoraConfig(r=2, layer_range=(0.9, 0.95)))


@pytest.mark.parametrize(
    "config",
    [
        lambda: ModulatedLoraConfig(r=0),
        lambda: ModulatedLoraConfig(layer_range=(0.5, 0.5)),
        lambda: ModulatedLoraConfig(coefficient=float("nan")),
        lambda: ModulatedLoraConfig(init_b="ones"),
        lambda: ModulatedPissaConfig(r="half"),
        lambda: ModulatedPissaConfig(selection="magic"),
    ],
)
def test_bad_configs_are_refused(config):
    with pytest.raises(ValueError):
        config()


def test_pissa_rank_larger_than_the_layer_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        get_peft_model(fresh(), ModulatedPissaConfig(r=65))


def test_entry_points_refuse_the_wrong_model_and_ambiguous_adapters(batches):
    from peft_ext import GateConfig, select_gates

    gates = get_peft_model(fresh(), GateConfig())
    for call in (lambda: set_coefficient(gates, 1.0), lambda: calibrate(gates, batches, progress=False)):
        with pytest.raises(TypeError, match="no modulated"):
            call()
    lora = get_peft_model(fresh(), make_config("mlora"))
    with pytest.raises(TypeError, match="no log-gate adapters"):
        select_gates(lora, batches, num_gates=4, progress=False)
    lora.add_adapter("other", make_config("mlora", coefficient=-1.0))
    lora.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 adapters are active"):
        get_coefficient(lora)
    assert get_coefficient(lora, "other") == -1.0
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        get_coefficient(lora, "nope")
