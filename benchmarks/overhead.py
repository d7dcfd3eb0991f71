"""Forward and training-step latency of adapted models as ratios to the base model and to PEFT's LoRA, fp32 and nf4.

All variants (gates dense and 5% sparse, PEFT LoRA, modulated LoRA and PiSSA at r8 on all linear layers, a bake of 4
kept rounds) are built from the same weights and timed in one process with interleaved repetitions (variant order
rotates every repetition); the table reports medians and the interquartile range, the JSON every sample, the trainable
parameters and the memory of one training step (activations saved for backward; trainable state; CUDA peak on a GPU).
The same set is measured on an nf4 copy of the base (bitsandbytes). The base model's training step is a full
fine-tuning step (every weight gets a gradient; on nf4 only the unquantized ones); adapters train only their own.

    python benchmarks/overhead.py --quick            # CPU, ~1 min
    python benchmarks/overhead.py --device cuda      # full size on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from timing import environment, interleaved, result_path, step_memory, summarize
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from peft_ext import GateConfig, ModulatedLoraConfig, ModulatedPissaConfig, bake, select_gates
from peft_ext.io import write_json
from peft_ext.tiny import model_config

SHAPES = {
    # name: (config file, overrides, batch, sequence length)
    "tiny": ("tiny-llama", {}, 8, 32),
    "small": ("tiny-llama", {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 128}, 4, 128),
}


def base_config(shape: str):
    name, overrides, _, _ = SHAPES[shape]
    return model_config(name, **overrides)


def variants(shape: str, device: str, dtype: torch.dtype, quantization: str | None, workdir: Path) -> dict:
    """Every variant built on the same base weights (fp32/bf16, or an nf4 copy loaded through bitsandbytes)."""
    config = base_config(shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(workdir / "base")

    def fresh():
        kwargs = {"dtype": dtype}
        if quantization == "nf4":
            kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_compute_dtype=dtype), device_map={"": device})
        return AutoModelForCausalLM.from_pretrained(workdir / "base", **kwargs).to(device).eval()

    rounds = []
    for k in range(4):  # four kept modulated-LoRA rounds for the bake variant
        torch.manual_seed(100 + k)
        get_peft_model(AutoModelForCausalLM.from_config(config), ModulatedLoraConfig(r=8, init_b="random")
                       ).save_pretrained(workdir / f"round{k}")
        rounds.append((str(workdir / f"round{k}"), 1.0))
    hidden_total = config.num_hidden_layers * config.hidden_size
    sparse = get_peft_model(fresh(), GateConfig(num_gates=max(1, hidden_total // 20)))
    select_gates(sparse, strategy="random", progress=False)
    return {
        "base": fresh(),
        "gates dense": get_peft_model(fresh(), GateConfig()),
        "gates 5%": sparse,
        "peft lora r8 all-linear": get_peft_model(fresh(), LoraConfig(r=8, target_modules="all-linear")),
        "mlora r8 all-linear": get_peft_model(fresh(), ModulatedLoraConfig(r=8)),
        "mpissa r8 all-linear": get_peft_model(fresh(), ModulatedPissaConfig(r=8)),  # SVD runs in the warm-up
        "bake of 4 rounds": bake(fresh(), rounds),
    }


def measure(shape: str, device: str, dtype: torch.dtype, quantization: str | None, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        models = variants(shape, device, dtype, quantization, Path(workdir))
    _, _, batch, length = SHAPES[shape]
    ids = torch.randint(4, 100, (batch, length), device=device)
    baselines = {"base": "base", "lora": "peft lora r8 all-linear"}
    # the bake trains nothing (a frozen history), so it has no training step to time
    trainable = {name: model for name, model in models.items() if any(p.requires_grad for p in model.parameters())}
    result = {"shape": shape, "quantization": quantization or str(dtype).removeprefix("torch."), "batch": batch,
              "sequence_length": length, "modes": {
                  "forward": summarize(interleaved(models, ids, repeats), baselines),
                  "train_step": summarize(interleaved(trainable, ids, repeats, train=True),
                                          {k: v for k, v in baselines.items() if v in trainable})}}
    result["trainable_parameters"] = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in models.items()
    }
    result["step_memory_mib"] = {name: step_memory(model, ids) for name, model in trainable.items()}
    return result


def qwen05b_parameter_counts() -> dict:
    """Trainable parameters of each family on a Qwen2.5-0.5B-shaped model (24 blocks x 896), on the meta device."""
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)
    adapters = {
        "gates dense": GateConfig(),
        "gates num_gates=5000": GateConfig(num_gates=5000),
        "peft lora r8 all-linear": LoraConfig(r=8, target_modules="all-linear"),
        "mlora r8 all-linear": ModulatedLoraConfig(r=8),
        "mpissa r16 all-linear": ModulatedPissaConfig(r=16),
        "mpissa r16 all-linear + quarantine": ModulatedPissaConfig(r=16, quarantine=True),
    }
    counts = {}
    for label, adapter in adapters.items():
        with init_empty_weights():
            model = get_peft_model(AutoModelForCausalLM.from_config(config), adapter)
        counts[label] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["gates num_gates=5000: free gates"] = 5000
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=result_path("overhead"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    repeats = 15 if args.quick else 50
    report = {
        **environment(args.device),
        "dtype": args.dtype,
        "seed": 0,
        "repeats": repeats,
        "results": [measure(shape, args.device, dtype, quantization, repeats)
                    for quantization in (None, "nf4") for shape in SHAPES],
        "qwen2.5-0.5b_shape_trainable_parameters": qwen05b_parameter_counts(),
    }
    write_json(args.out, report)
    for result in report["results"]:
        print(f"\n{result['shape']} (batch {result['batch']} x {result['sequence_length']} tokens, "
              f"{result['quantization']}, {report['device']}, {report['threads']} threads)")
        print(f"{'variant':<26}{'mode':<12}{'median ms':>10}{'IQR ms':>9}{'x base':>8}{'x LoRA':>8}{'act. MiB':>10}")
        for mode, rows in result["modes"].items():
            for name, row in rows.items():
                memory = result["step_memory_mib"][name]["saved_activations_mib"] if mode == "train_step" else float("nan")
                print(f"{name:<26}{mode:<12}{row['median_ms']:>10.2f}{row['iqr_ms']:>9.2f}"
                      f"{row.get('ratio_to_base', float('nan')):>8.3f}{row['ratio_to_lora']:>8.3f}{memory:>10.1f}")
    print("\nTrainable parameters, Qwen2.5-0.5B-shaped model (24 x 896):")
    for label, count in report["qwen2.5-0.5b_shape_trainable_parameters"].items():
        print(f"  {label:<40}{count:>12,}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
