"""Adaptation quality on a learnable task with a held-out split, and composition of two controllers, over seeds.

Base: a Llama-shaped model pre-trained (every weight, once, seed 0) to copy a word after ``:``, on 16,000 distinct
words: `` word`` mostly, upper case in 20% of rows and with a leading ``*`` in 20% of rows, independently
(``peft_ext.demo.copy_mixture``). It copies unseen words, and greedy decoding almost never picks a rare style. Task A:
always `` WORD``; task B: always `` *word``; 300 training words and 200 held-out words, none seen in pre-training.
Each method is fitted on task A with AdamW for ``--steps`` steps: gradient-selected gates at each count of the sweep,
random gates at the same counts (the control), dense gates (every gate trainable), PEFT LoRA r8 all-linear and
modulated LoRA r8 all-linear. Composition: a gradient-gate controller for A and one for B, composed with weights
[1, 1] (``compose_gates``, with the default budget and with budget 1.0, which clips nothing), each scored on A, B and
both at once (`` *WORD``); the control is one controller with as many gates as the two together, fitted on both at
once. Seeds change the adapters' initialisation, the random gates and the data order; the base and the split are the
same.

Reported per method (mean and standard deviation over seeds): held-out exact match (greedy decoding reproduces the
completion) and completion NLL, adaptation time (selection + fit) and the memory of one training step.

    python benchmarks/quality.py --quick                 # 4 x 64 model, gates 32 / 64 / 128 of 256; minutes on CPU
    python benchmarks/quality.py --device cuda           # 8 x 768 model, gates 512 / 2,048 / 5,000 of 6,144
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from timing import environment, result_path, step_memory
from transformers import AutoModelForCausalLM

from peft_ext import GateConfig, ModulatedLoraConfig, compose_gates, select_gates
from peft_ext.data import Example, evaluate, make_batches
from peft_ext.demo import copy_mixture, pretrain_base, split_words, styled
from peft_ext.fit import fit
from peft_ext.io import write_json
from peft_ext.tiny import char_tokenizer, model_config

SHAPES = {  # name: (overrides of configs/tiny-llama.json, pre-training steps, gate counts of the sweep)
    "quick": ({}, 1200, (32, 64, 128)),
    "full": ({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
              "num_key_value_heads": 12, "head_dim": 64}, 3000, (512, 2048, 5000)),
}
TASKS = {"A": {"upper": True}, "B": {"starred": True}, "A and B": {"upper": True, "starred": True}}
LEARNING_RATES = {"gates": 2e-2, "lora": 1e-2}


def base_model(shape: str):
    config = model_config(**SHAPES[shape][0])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def methods(counts: tuple[int, ...]) -> dict:
    """name: (adapter config factory, selection strategy or None, learning rate)."""
    table = {}
    for count in counts:
        table[f"gates {count} gradient"] = (lambda c=count: GateConfig(num_gates=c, max_log_gate=0.5), "gradient")
        table[f"gates {count} random"] = (lambda c=count: GateConfig(num_gates=c, max_log_gate=0.5), "random")
    table["gates dense"] = (lambda: GateConfig(max_log_gate=0.5), None)
    table["peft lora r8"] = (lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), None)
    table["modulated lora r8"] = (lambda: ModulatedLoraConfig(r=8, alpha=16.0), None)
    return table


def adapt(load, config, strategy, train, steps, seed) -> tuple:
    """Fit ``config`` on ``train``; return the model, the seconds of selection + fit and one step's memory."""
    torch.manual_seed(seed)
    model = get_peft_model(load(), config)
    lr = LEARNING_RATES["gates" if isinstance(config, GateConfig) else "lora"]
    start = time.perf_counter()
    if strategy is not None:
        select_gates(model, train, strategy=strategy, seed=seed, progress=False)
    memory = step_memory(model, train[0]["input_ids"].to(next(model.parameters()).device))
    fit(model, train, steps=steps, lr=lr, progress=False)
    return model, time.perf_counter() - start, memory


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run(shape: str, seeds: int, steps: int, pretrain_steps: int, workdir: Path, device: str) -> dict:
    tokenizer = char_tokenizer()
    pretrain_words, train_words, held_words = split_words(0, train=300, held_out=200)

    def batches(style: dict, chosen: list[str], seed=None) -> list[dict]:
        return make_batches(tokenizer, [Example(f"{w}:", styled(w, **style)) for w in chosen], 32, seed=seed)

    start = time.perf_counter()
    pretrain_base(workdir / "base", tokenizer, copy_mixture(pretrain_words, 0, p_upper=0.2, p_starred=0.2),
                  steps=pretrain_steps, seed=0, model=base_model(shape).to(device))
    pretrain_seconds = time.perf_counter() - start
    load = lambda: AutoModelForCausalLM.from_pretrained(workdir / "base").to(device).eval()  # noqa: E731
    held = {task: batches(style, held_words) for task, style in TASKS.items()}
    pretrained = load()
    base = {task: evaluate(pretrained, task_batches) for task, task_batches in held.items()}
    base_copies = evaluate(pretrained, batches({}, held_words))["exact_match"]  # its own style, on unseen words
    counts = SHAPES[shape][2]
    rows: dict[str, dict[str, list]] = {}
    composition: dict[str, dict[str, list]] = {}
    for seed in range(seeds):
        train = {task: batches(TASKS[task], train_words, seed=seed) for task in ("A", "B")}
        for name, (factory, strategy) in methods(counts).items():
            model, seconds, memory = adapt(load, factory(), strategy, train["A"], steps, seed)
            result = evaluate(model, held["A"])
            row = rows.setdefault(name, {"exact_match": [], "nll": [], "seconds": [], "memory": []})
            row["exact_match"].append(result["exact_match"])
            row["nll"].append(result["nll"])
            row["seconds"].append(seconds)
            row["memory"].append(memory)
        # composition: one gradient-gate controller per task, both composed, and (the control) one controller with
        # as many gates as both fitted on the joint task directly
        count = counts[1]

        def score(model, label: str) -> None:
            for task, task_batches in held.items():
                entry = composition.setdefault(f"{label} on task {task}", {"exact_match": [], "nll": []})
                result = evaluate(model, task_batches)
                entry["exact_match"].append(result["exact_match"])
                entry["nll"].append(result["nll"])

        with tempfile.TemporaryDirectory() as adapters:
            for task in train:
                model, _, _ = adapt(load, GateConfig(num_gates=count, max_log_gate=0.5), "gradient", train[task],
                                    steps, seed)
                model.save_pretrained(Path(adapters) / task)
            combined = PeftModel.from_pretrained(load(), Path(adapters) / "A", adapter_name="A")
            combined.load_adapter(Path(adapters) / "B", adapter_name="B")
            plan = compose_gates(combined, ["A", "B"], [1.0, 1.0], adapter_name="A+B")
            compose_gates(combined, ["A", "B"], [1.0, 1.0], budget=1.0, adapter_name="A+B, budget 1")  # no clipping
            for label in ("A", "B", "A+B", "A+B, budget 1"):
                combined.set_adapter(label)
                score(combined, label)
            joint, _, _ = adapt(load, GateConfig(num_gates=2 * count, max_log_gate=0.5), "gradient",
                                batches(TASKS["A and B"], train_words, seed=seed), steps, seed)
            score(joint, "joint fit")
            composition.setdefault("plan", []).append({key: plan[key] for key in
                                                       ("union_gates", "clipped_fraction", "sign_conflicts", "pairs")})
    config = base_model(shape).config
    capacity = config.num_hidden_layers * config.hidden_size
    return {
        "shape": shape, "gate_capacity": capacity, "pretrain_steps": pretrain_steps, "steps": steps,
        "seeds": list(range(seeds)), "learning_rates": LEARNING_RATES, "pretrain_seconds": pretrain_seconds,
        "composition_gates": counts[1],
        "base": {task: {"exact_match": r["exact_match"], "nll": r["nll"]} for task, r in base.items()},
        "base_plain_copy_exact_match": base_copies,
        "methods": {name: {"exact_match": summarize(row["exact_match"]), "nll": summarize(row["nll"]),
                           "seconds": summarize(row["seconds"]), "step_memory": row["memory"][0]}
                    for name, row in rows.items()},
        "composition": {name: ({"exact_match": summarize(entry["exact_match"]), "nll": summarize(entry["nll"])}
                               if name != "plan" else entry) for name, entry in composition.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, help="default: the shape's (1,200 quick, 3,000 full)")
    parser.add_argument("--out", default=result_path("quality"))
    args = parser.parse_args()
    shape = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as workdir:
        pretrain_steps = args.pretrain_steps or SHAPES[shape][1]
        result = run(shape, args.seeds, args.steps, pretrain_steps, Path(workdir), args.device)
    report = {**environment(args.device), "dtype": "float32", **result}
    write_json(args.out, report)
    print(f"task A held-out, {shape} model ({report['gate_capacity']} gates), {args.steps} steps, "
          f"{args.seeds} seeds: base exact match {report['base']['A']['exact_match']:.1%}, "
          f"NLL {report['base']['A']['nll']:.3f}; it copies {report['base_plain_copy_exact_match']:.1%} of held-out "
          "words in its own style")
    print(f"{'method':<24}{'exact match':>14}{'NLL':>16}{'seconds':>9}{'act. MiB':>10}")
    for name, row in report["methods"].items():
        em, nll = row["exact_match"], row["nll"]
        print(f"{name:<24}{em['mean']:>8.1%} ±{em['std']:>4.1%}{nll['mean']:>9.3f} ±{nll['std']:.3f}"
              f"{row['seconds']['mean']:>9.1f}{row['step_memory']['saved_activations_mib']:>10.1f}")
    print(f"composition ({report['composition_gates']} gradient gates per task), exact match:")
    for name, row in report["composition"].items():
        if name != "plan":
            print(f"  {name:<26}{row['exact_match']['mean']:>8.1%} ±{row['exact_match']['std']:.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
