"""Forward time of a history bake with K kept rounds, as ratios to the base model, measured in one run.

For K = 1, 4, 16 modulated-LoRA rounds (rank 8, all linear layers, independent random factors) the variants are:
the K rounds as K separate active adapters; the uncompressed bake (one pair of rank 8K per module); the exactly
compressed bake (QR + SVD, numerically zero directions dropped); and a bake truncated to 99% of the energy, with its
relative error. Interleaved repetitions in one process; medians and IQRs.

    python benchmarks/bake_forward.py --quick          # CPU, about a minute
    python benchmarks/bake_forward.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from overhead import SHAPES, base_config
from peft import PeftModel, get_peft_model
from timing import environment, interleaved, result_path, summarize
from transformers import AutoModelForCausalLM

from peft_ext import ModulatedLoraConfig, bake, set_coefficient
from peft_ext.io import write_json

ROUNDS = (1, 4, 16)
RANK = 8


def build(shape: str, device: str, workdir: Path) -> tuple[dict, dict]:
    config = base_config(shape)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()

    def fresh():
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state)
        return model.to(device).eval()

    dirs = []
    for k in range(max(ROUNDS)):
        base = fresh()
        torch.manual_seed(1000 + k)
        get_peft_model(base, ModulatedLoraConfig(r=RANK, init_b="random")).save_pretrained(workdir / f"round{k}")
        dirs.append(str(workdir / f"round{k}"))
    models, ranks = {"base": fresh()}, {}
    for count in ROUNDS:
        kept = [(d, 1.0) for d in dirs[:count]]
        separate = PeftModel.from_pretrained(fresh(), dirs[0], adapter_name="r0")
        for k in range(1, count):
            separate.load_adapter(dirs[k], adapter_name=f"r{k}")
        separate.base_model.set_adapter([f"r{k}" for k in range(count)])
        for k in range(count):
            set_coefficient(separate, 1.0, f"r{k}")
        variants = {
            f"K={count} separate adapters": separate,
            f"K={count} bake": bake(fresh(), kept, compress=False),
            f"K={count} bake compressed": bake(fresh(), kept),
            f"K={count} bake energy 0.99": bake(fresh(), kept, energy=0.99),
        }
        for name, model in variants.items():
            models[name] = model.eval()
            if "bake" in name:
                baked = model.peft_config["default"]
                ranks[name] = {"mean_rank": statistics.mean(baked.ranks.values()),
                               "max_relative_error": max(baked.relative_error.values(), default=0.0)}
    return models, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=result_path("bake_forward"))
    args = parser.parse_args()
    repeats = 10 if args.quick else 40
    _, _, batch, length = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as workdir:
        models, ranks = build(args.shape, args.device, Path(workdir))
    ids = torch.randint(4, 100, (batch, length), device=args.device)
    rows = summarize(interleaved(models, ids, repeats), {"base": "base"})
    for name, info in ranks.items():
        rows[name].update(info)
    report = {**environment(args.device), "dtype": "float32", "seed": 0, "repeats": repeats, "shape": args.shape,
              "batch": batch, "sequence_length": length, "round_rank": RANK, "forward": rows}
    write_json(args.out, report)
    print(f"{args.shape}: batch {batch} x {length} tokens, fp32, {report['device']}, {report['threads']} threads")
    print(f"{'variant':<30}{'median ms':>10}{'IQR ms':>9}{'x base':>8}{'mean rank':>11}{'rel. error':>12}")
    for name, row in rows.items():
        extra = f"{row['mean_rank']:>11.1f}{row['max_relative_error']:>12.2e}" if "mean_rank" in row else ""
        print(f"{name:<30}{row['median_ms']:>10.2f}{row['iqr_ms']:>9.2f}{row['ratio_to_base']:>8.3f}{extra}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
