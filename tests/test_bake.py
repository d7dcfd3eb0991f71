"""History bakes: folding kept rounds, exact compression, loading through PEFT, and training the next round on top."""

import json
import math

import pytest
import torch
from conftest import OneLinear, fresh, load_base
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from peft_ext import (
    GateConfig,
    HistoryBakeConfig,
    ModulatedLoraConfig,
    ModulatedPissaConfig,
    RoundError,
    add_round,
    bake,
    load_adapter_model,
    reference,
    set_coefficient,
)
from peft_ext.bake import compress_factors
from peft_ext.data import evaluate
from peft_ext.fit import fit
from peft_ext.tuners.hbake import HistoryBakeLayer

COEFFICIENTS = {"mlora_a": 1.33, "mlora_b": -0.5, "mpissa": -0.7, "lora": 0.8}


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def randomize_pissa(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mpissa_delta_s" in name:
                p.copy_(torch.randn(p.shape, generator=generator))


def save_rounds(root, make_base, targets, forward_input):
    """Four kept rounds of different families, ranks and targets, saved like a user would."""
    configs = {
        "mlora_a": ModulatedLoraConfig(r=4, init_b="random", target_modules=targets["mlora_a"]),
        "mlora_b": ModulatedLoraConfig(r=2, alpha=4.0, init_b="random", target_modules=targets["mlora_b"]),
        "mpissa": ModulatedPissaConfig(r=3, target_modules=targets["mpissa"]),
        "lora": LoraConfig(r=2, lora_alpha=6, use_rslora=True, init_lora_weights=False, target_modules=targets["lora"]),
    }
    dirs = {}
    for seed, (name, config) in enumerate(configs.items()):
        base = make_base()
        torch.manual_seed(100 + seed)  # distinct random factors per round
        model = get_peft_model(base, config)
        if name == "mpissa":
            model(forward_input)  # runs the deferred SVD
            randomize_pissa(model, seed)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def decoder_rounds(tmp_path_factory):
    targets = {"mlora_a": ["q_proj", "v_proj", "down_proj"], "mlora_b": ["q_proj", "up_proj"],
               "mpissa": ["q_proj", "o_proj"], "lora": ["k_proj", "q_proj"]}
    ids = torch.randint(4, 100, (1, 8))
    return save_rounds(tmp_path_factory.mktemp("rounds"), fresh, targets, ids)


def rounds_list(dirs, names=tuple(COEFFICIENTS)):
    return [(str(dirs[name]), COEFFICIENTS[name]) for name in names]


def all_rounds_active(dirs):
    """The base model with every round applied at its coefficient, merged round by round into fp32 weights."""
    model = PeftModel.from_pretrained(fresh(), dirs["mlora_a"], adapter_name="a")
    model.load_adapter(dirs["mlora_b"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    set_coefficient(model, COEFFICIENTS["mlora_a"], "a")
    set_coefficient(model, COEFFICIENTS["mlora_b"], "b")
    merged = model.merge_and_unload()
    pissa = PeftModel.from_pretrained(merged, dirs["mpissa"])
    set_coefficient(pissa, COEFFICIENTS["mpissa"])
    merged = pissa.merge_and_unload()
    lora = PeftModel.from_pretrained(merged, dirs["lora"])
    for module in lora.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", COEFFICIENTS["lora"])
    return lora.merge_and_unload()


def one_linear():
    torch.manual_seed(0)
    return OneLinear()


def bake_layers(model):
    return [m for m in model.modules() if isinstance(m, HistoryBakeLayer)]


def has_adapters(model):
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


# -- the math ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_bake_on_a_single_linear_equals_the_analytic_sum(tmp_path, compress):
    torch.manual_seed(0)
    x = torch.randn(7, 16)
    targets = {name: ["lin"] for name in COEFFICIENTS}
    dirs = save_rounds(tmp_path, one_linear, targets, x)
    expected = one_linear()(x)
    for name, c in COEFFICIENTS.items():
        tensors = load_file(dirs[name] / "adapter_model.safetensors")
        config = json.loads((dirs[name] / "adapter_config.json").read_text())
        t = {key.rsplit(".lin.", 1)[1]: value for key, value in tensors.items()}
        if name.startswith("mlora"):
            delta = x @ t["mlora_A"].T @ t["mlora_B"].T * (config["alpha"] / config["r"])
        elif name == "mpissa":
            delta = ((x @ t["mpissa_vt"].T) * t["mpissa_delta_s"]) @ t["mpissa_u"].T
        else:
            delta = x @ t["lora_A.weight"].T @ t["lora_B.weight"].T * (config["lora_alpha"] / math.sqrt(config["r"]))
        assert delta.abs().max() > 1e-2
        expected = expected + c * delta
    baked = bake(one_linear(), rounds_list(dirs), compress=compress)
    with torch.no_grad():
        out = baked(x)
    assert torch.allclose(out, expected.detach(), atol=2e-6, rtol=0)
    (layer,) = bake_layers(baked)
    assert layer.hbake_A["default"].shape[0] == (4 + 2 + 3 + 2 if not compress else 11)


def test_bake_equals_all_rounds_active_on_a_tiny_decoder(decoder_rounds, input_ids):
    expected = logits(all_rounds_active(decoder_rounds), input_ids)
    base_logits = logits(fresh(), input_ids)
    for compress in (True, False):
        baked = bake(fresh(), rounds_list(decoder_rounds), compress=compress)
        out = logits(baked, input_ids)
        assert (expected - base_logits).abs().max() > 0.05
        assert torch.allclose(out, expected, atol=2e-5, rtol=0), (compress, (out - expected).abs().max())
        config = baked.peft_config["default"]
        q_proj = "model.layers.0.self_attn.q_proj"  # touched by all four rounds: ranks 4 + 2 + 3 + 2
        assert config.ranks[q_proj] == 11 and config.ranks["model.layers.0.self_attn.k_proj"] == 2
        assert len(config.rounds) == 4 and [r["coefficient"] for r in config.rounds] == list(COEFFICIENTS.values())
        # one low-rank pair per module, however many rounds
        assert all(len(layer.hbake_A) == 1 for layer in bake_layers(baked))


def test_compression_is_exact_and_truncation_reports_the_dense_svd_error():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=generator)
    b = torch.randn(16, 12, generator=generator) * torch.logspace(0, -2, 12)
    b[:, 11] = b[:, 0] * 0.5  # column 11 repeats direction 0: the product has rank 11 only
    a[11] = a[0]
    dense = (b @ a).double()
    sigma = torch.linalg.svdvals(dense)
    new_a, new_b, error = compress_factors(a, b)
    assert new_a.shape == (11, 20) and new_b.shape == (16, 11)
    assert float((new_b @ new_a - dense).norm() / dense.norm()) < 1e-6
    assert error < 1e-6
    for kwargs, keep in (({"max_rank": 5}, 5), ({"energy": 0.99}, None)):
        new_a, new_b, error = compress_factors(a, b, **kwargs)
        if keep is None:  # smallest k whose singular values hold 99% of the energy
            share = (sigma**2).cumsum(0) / (sigma**2).sum()
            keep = int((share < 0.99).sum()) + 1
            assert share[keep - 1] >= 0.99 and share[keep - 2] < 0.99
        assert new_a.shape[0] == keep
        best = float(sigma[keep:].pow(2).sum().sqrt() / sigma.pow(2).sum().sqrt())
        actual = float((new_b.double() @ new_a.double() - dense).norm() / dense.norm())
        assert error == pytest.approx(best, rel=1e-6)
        assert actual == pytest.approx(best, rel=1e-4)


def test_truncated_bake_records_the_error_per_module(decoder_rounds):
    baked = bake(fresh(), rounds_list(decoder_rounds), max_rank=3)
    config = baked.peft_config["default"]
    assert max(config.ranks.values()) == 3
    q_proj = "model.layers.0.self_attn.q_proj"
    assert config.relative_error[q_proj] > 1e-3  # rank 11 cut to 3
    assert config.relative_error["model.layers.0.self_attn.k_proj"] < 1e-6  # rank 2 untouched
    layer = baked.get_base_model().get_submodule(q_proj)
    exact = bake(fresh(), rounds_list(decoder_rounds)).get_base_model().get_submodule(q_proj)
    dense = exact.delta_weight("default").double()
    truncated = layer.delta_weight("default").double()
    assert float((truncated - dense).norm() / dense.norm()) == pytest.approx(config.relative_error[q_proj], rel=1e-3)


# -- PEFT behaviour ---------------------------------------------------------------------------------------------------
def test_empty_bake_is_identity_and_switching_off_restores_the_base(decoder_rounds, input_ids):
    base_logits = logits(fresh(), input_ids)
    empty = get_peft_model(fresh(), HistoryBakeConfig(ranks={"model.layers.1.mlp.down_proj": 3}))
    assert torch.equal(logits(empty, input_ids), base_logits)
    baked = bake(fresh(), rounds_list(decoder_rounds))
    assert not torch.equal(logits(baked, input_ids), base_logits)
    assert not any(p.requires_grad for p in baked.parameters())
    with baked.disable_adapter():
        assert torch.equal(logits(baked, input_ids), base_logits)
    set_coefficient(baked, 0.0)
    assert torch.equal(logits(baked, input_ids), base_logits)
    set_coefficient(baked, 1.0)
    unloaded = baked.unload()
    assert torch.equal(logits(unloaded, input_ids), base_logits) and not has_adapters(unloaded)


def test_merge_and_unload_of_a_bake(decoder_rounds, input_ids):
    baked = bake(fresh(), rounds_list(decoder_rounds))
    expected = logits(baked, input_ids)
    merged = baked.merge_and_unload()
    assert not has_adapters(merged)
    assert torch.allclose(logits(merged, input_ids), expected, atol=2e-5, rtol=0)


def test_save_and_reload_is_exact_and_refuses_another_architecture(decoder_rounds, input_ids, tmp_path, saved_models):
    baked = bake(fresh(), rounds_list(decoder_rounds))
    expected = logits(baked, input_ids)
    baked.save_pretrained(tmp_path / "bake")
    saved = load_file(tmp_path / "bake" / "adapter_model.safetensors")
    assert saved and all(".hbake_" in key for key in saved)
    reloaded = load_adapter_model(load_base(saved_models), str(tmp_path / "bake"))
    assert torch.equal(logits(reloaded, input_ids), expected)
    config = json.loads((tmp_path / "bake" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HBAKE" and config["target_modules"] == sorted(config["ranks"])
    qwen = load_base(saved_models, "tiny-qwen2")  # 6 blocks of another width: shapes differ
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(qwen, tmp_path / "bake")
    smaller = fresh()
    del smaller.model.layers[3]
    with pytest.raises(ValueError, match="does not fit the model"):
        PeftModel.from_pretrained(smaller, tmp_path / "bake")
    assert not has_adapters(smaller)  # refused before anything was wrapped


# -- the next round on top --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mlora", "mpissa"])
def test_training_a_round_on_top_of_a_bake(family, decoder_rounds, batches, input_ids, tmp_path):
    base_logits = logits(fresh(), input_ids)
    bake(fresh(), rounds_list(decoder_rounds)).save_pretrained(tmp_path / "bake")
    history = PeftModel.from_pretrained(fresh(), tmp_path / "bake")
    history_logits = logits(history, input_ids)
    config = ModulatedLoraConfig(r=8) if family == "mlora" else ModulatedPissaConfig(r="full")
    model = add_round(history, config)
    assert torch.equal(logits(model, input_ids), history_logits)  # a fresh round is a no-op on top of the history
    baked_buffers = {k: v.clone() for k, v in model.state_dict().items() if ".hbake_" in k}
    before = evaluate(model, batches)["nll"]
    fit(model, batches, steps=15, lr=2e-2, progress=False)
    assert evaluate(model, batches)["nll"] < before - 0.1
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(f"{family}_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in baked_buffers.items())
    trained = logits(model, input_ids)
    with reference(model, include_history=False):
        assert torch.equal(logits(model, input_ids), base_logits)
    with reference(model, include_history=True):
        assert torch.equal(logits(model, input_ids), history_logits)
    assert torch.equal(logits(model, input_ids), trained)  # flags restored

    model.save_pretrained(tmp_path / "round")  # the new round alone, loadable onto the plain base
    saved = load_file(tmp_path / "round" / "adapter_model.safetensors")
    assert saved and all(f".{family}_" in key for key in saved)
    alone = load_adapter_model(fresh(), str(tmp_path / "round"))
    assert not torch.equal(logits(alone, input_ids), trained)
    appended = bake(fresh(), [(str(tmp_path / "bake"), 1.0), (str(tmp_path / "round"), 1.0)])
    assert torch.allclose(logits(appended, input_ids), trained, atol=2e-5, rtol=0)
    assert len(appended.peft_config["default"].rounds) == 5

    unloaded = model.unload()  # unloading the round keeps the history underneath
    assert torch.equal(logits(unloaded, input_ids), history_logits)


def test_pissa_round_on_a_bake_takes_the_svd_of_the_base_weight(decoder_rounds, input_ids):
    plain = get_peft_model(fresh(), ModulatedPissaConfig(r=4, target_modules=["q_proj"]))
    plain(input_ids)
    stacked = add_round(bake(fresh(), rounds_list(decoder_rounds)), ModulatedPissaConfig(r=4, target_modules=["q_proj"]))
    stacked(input_ids)
    key = "model.layers.0.self_attn.q_proj"
    assert torch.equal(stacked.get_base_model().get_submodule(key).mpissa_vt["default"],
                       plain.get_base_model().get_submodule(key).mpissa_vt["default"])


def test_reference_restores_flags_after_errors_and_refuses_merged(decoder_rounds, input_ids):
    model = add_round(bake(fresh(), rounds_list(decoder_rounds)), ModulatedLoraConfig(r=4, init_b="random"))
    expected = logits(model, input_ids)
    with pytest.raises(KeyError):
        with reference(model, include_history=False):
            raise KeyError("boom")
    assert torch.equal(logits(model, input_ids), expected)
    history_logits = logits(bake(fresh(), rounds_list(decoder_rounds)), input_ids)
    set_coefficient(model, 0.0)  # the round's coefficient only; the bake below keeps its own
    assert torch.equal(logits(model, input_ids), history_logits)
    set_coefficient(model, 1.0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge first"):
        with reference(model, include_history=True):
            pass
    with pytest.raises(TypeError, match="has no adapters"):
        with reference(fresh(), include_history=True):
            pass


# -- bitsandbytes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["nf4", "8bit"])
def test_bnb_bake_reload_and_round_on_top(quantization, decoder_rounds, saved_models, batches, input_ids, tmp_path):
    base_logits = logits(load_base(saved_models, quantization=quantization), input_ids)
    baked = bake(load_base(saved_models, quantization=quantization), rounds_list(decoder_rounds))
    expected = logits(baked, input_ids)
    assert (expected - base_logits).abs().max() > 0.05
    layer = baked.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 64)
    with torch.no_grad():  # the bake adds B(Ax) on top of the quantized layer's output
        added = layer(x) - layer.base_layer(x)
    assert torch.allclose(added, x @ layer.hbake_A["default"].T @ layer.hbake_B["default"].T, atol=1e-5, rtol=0)
    baked.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_base(saved_models, quantization=quantization), tmp_path)
    assert torch.equal(logits(reloaded, input_ids), expected)
    model = add_round(reloaded, ModulatedLoraConfig(r=4))
    model.train()
    model(**batches[0]).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.eval()
    with reference(model, include_history=False):
        assert torch.equal(logits(model, input_ids), base_logits)
    with reference(model, include_history=True):
        assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.parametrize("quantization", [None, "8bit"])
def test_merging_a_round_into_the_weights_keeps_the_history(quantization, decoder_rounds, saved_models, input_ids):
    history_logits = logits(bake(load_base(saved_models, quantization=quantization), rounds_list(decoder_rounds)),
                            input_ids)
    model = add_round(bake(load_base(saved_models, quantization=quantization), rounds_list(decoder_rounds)),
                      ModulatedLoraConfig(r=4, init_b="random", coefficient=0.5))
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert bake_layers(merged) and not any("mlora" in type(m).__name__.lower() for m in merged.modules())
    error = float((logits(merged, input_ids) - expected).abs().max())
    effect = float((expected - history_logits).abs().max())
    assert error < (1e-5 if quantization is None else 0.25 * effect), (error, effect)


# -- refusing bad rounds ----------------------------------------------------------------------------------------------
def corrupt(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def with_nan(folder):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda f: (f / "adapter_config.json").unlink(), "not a PEFT adapter folder"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), "cannot be read as JSON"),
        (corrupt, "corrupt or truncated"),
        (with_nan, "NaN or inf"),
    ],
)
def test_a_missing_or_corrupt_round_is_refused_before_anything_changes(damage, message, decoder_rounds, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(decoder_rounds["mpissa"], broken)
    damage(broken)
    base = fresh()
    with pytest.raises(RoundError, match=message):
        bake(base, [(str(decoder_rounds["mlora_a"]), 1.0), (str(broken), 1.0)])
    assert not has_adapters(base)


def test_rounds_that_cannot_be_baked_are_refused(decoder_rounds, saved_models, tmp_path):
    with pytest.raises(RoundError, match="no such adapter folder"):
        bake(fresh(), [(str(tmp_path / "absent"), 1.0)])
    get_peft_model(fresh(), GateConfig()).save_pretrained(tmp_path / "gates")
    with pytest.raises(RoundError, match="LOGGATE adapter cannot be baked"):
        bake(fresh(), [(str(tmp_path / "gates"), 1.0)])
    get_peft_model(fresh(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])).save_pretrained(tmp_path / "dora")
    with pytest.raises(RoundError, match="use_dora"):
        bake(fresh(), [(str(tmp_path / "dora"), 1.0)])
    get_peft_model(fresh(), ModulatedPissaConfig(r=2, quarantine=True)).save_pretrained(tmp_path / "quarantine")
    with pytest.raises(RoundError, match="drop_quarantine"):
        bake(fresh(), [(str(tmp_path / "quarantine"), 1.0)])
    get_peft_model(fresh("tiny-qwen2"), ModulatedLoraConfig(r=2)).save_pretrained(tmp_path / "qwen")
    with pytest.raises(RoundError, match="fitted to a different model"):
        bake(fresh(), [(str(tmp_path / "qwen"), 1.0)])
    with pytest.raises(ValueError, match="plain base model"):
        bake(get_peft_model(fresh(), ModulatedLoraConfig(r=2)).get_base_model(), rounds_list(decoder_rounds))
    with pytest.raises(ValueError, match="need compress=True"):
        bake(fresh(), rounds_list(decoder_rounds), compress=False, max_rank=2)
    with pytest.raises(ValueError, match="energy"):
        bake(fresh(), rounds_list(decoder_rounds), energy=1.5)
    with pytest.raises(ValueError, match="trainable adapter"):
        add_round(bake(fresh(), rounds_list(decoder_rounds)), HistoryBakeConfig(ranks={"lm_head": 1}))
    with pytest.raises(TypeError, match="history bake"):
        add_round(get_peft_model(fresh(), ModulatedLoraConfig(r=2)), ModulatedLoraConfig(r=2))
