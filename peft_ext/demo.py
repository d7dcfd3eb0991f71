"""End-to-end demo on a tiny model, offline: steer a model that answers in either case towards upper case.

1. Write the task as ``train.jsonl`` / ``held_out.jsonl`` (prompt/completion rows) and read it back like user data.
   Pre-train ``configs/tiny-llama.json`` briefly on ``"word:" -> " word"`` or ``" WORD"`` (50/50), save it.
2. Reload it with ``from_pretrained``; fit sparse log-gate controllers on upper-case completions: gradient-selected
   gates and, as the control, the same number of random gates.
3. Evaluate base vs controllers on held-out words (teacher-forced completion NLL, exact match).
4. Save the controller, reload it with ``PeftModel.from_pretrained`` (exactness checked), and on a 4-bit copy.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from .data import Example, cycle, evaluate, load_examples, make_batches, to_device
from .fit import fit
from .io import atomic_write, write_json
from .selection import select_gates
from .tiny import build_model, char_tokenizer
from .tuners.loggate import GateConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5))))
    ordered = sorted(words)  # a set's order changes with each process's string hashing: sort before shuffling
    rng.shuffle(ordered)
    return ordered


def pretrain_base(directory: Path, tokenizer, words: list[str], steps: int, seed: int, separators: str = ":",
                  model=None) -> None:
    """Train every weight of ``model`` (default: the tiny Llama) on ``"word<sep>"`` -> ``" word"`` or ``" WORD"``
    (50/50, for each separator) and save it with the tokenizer: the 'pre-trained' base."""
    rng = random.Random(seed)
    mixture = [Example(f"{w}{sep}", " " + (w.upper() if rng.random() < 0.5 else w))
               for w in words for sep in separators for _ in range(2)]
    model = model if model is not None else build_model("tiny-llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    device = next(model.parameters()).device
    for batch, _ in zip(cycle(make_batches(tokenizer, mixture, 32)), range(steps)):
        loss = model(**to_device(batch, device)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.cpu().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_demo(out_dir: str | Path | None = None, num_gates: int = 64, steps: int = 150, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="peft-ext-demo-"))
    tokenizer = char_tokenizer()
    words = make_words(360, seed)
    train_words, held_words = words[:300], words[300:]
    data = {}
    for split, split_words in (("train", train_words), ("held_out", held_words)):  # the dataset, as a user's files
        rows = "".join(json.dumps({"prompt": f"{w}:", "completion": " " + w.upper()}) + "\n" for w in split_words)
        data[split] = atomic_write(out / f"{split}.jsonl", lambda temporary, text=rows: Path(temporary).write_text(text))
    train, held = (make_batches(tokenizer, load_examples(data[split]), 32) for split in ("train", "held_out"))

    start = time.perf_counter()
    pretrain_base(out / "base", tokenizer, train_words, steps=400, seed=seed)
    report = {"base_dir": str(out / "base"), "data": {split: str(path) for split, path in data.items()},
              "pretrain_seconds": round(time.perf_counter() - start, 2), "rows": []}
    load = lambda **kw: AutoModelForCausalLM.from_pretrained(out / "base", **kw).eval()  # noqa: E731
    report["rows"].append({"model": "base", **evaluate(load(), held)})

    for strategy in ("gradient", "random"):
        model = get_peft_model(load(), GateConfig(num_gates=num_gates, max_log_gate=0.5))
        selection = select_gates(model, train, strategy=strategy, seed=seed, progress=False)
        fitted = fit(model, train, steps=steps, lr=2e-2, progress=False)
        row = {"model": f"{num_gates} {strategy} gates", **evaluate(model, held),
               "select_seconds": selection["seconds"], "fit_seconds": fitted["seconds"]}
        report["rows"].append(row)
        if strategy == "gradient":
            adapter_dir = out / "controller"
            model.save_pretrained(adapter_dir)
            probe = held[0]["input_ids"]
            with torch.no_grad():
                expected = model(probe).logits
                reloaded = PeftModel.from_pretrained(load(), adapter_dir)
                report["reload_exact"] = bool(torch.equal(reloaded(probe).logits, expected))
            report["adapter_dir"] = str(adapter_dir)

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base_4bit = load(quantization_config=quantization, device_map="cpu")
    report["rows"].append({"model": "base, 4-bit", **evaluate(base_4bit, held)})
    controller_4bit = PeftModel.from_pretrained(base_4bit, report["adapter_dir"])
    report["rows"].append({"model": f"{num_gates} gradient gates, 4-bit base", **evaluate(controller_4bit, held)})
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / "demo_report.json", report)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'model':<32} {'held-out NLL':>12} {'exact match':>12}"]
    for row in report["rows"]:
        lines.append(f"{row['model']:<32} {row['nll']:>12.4f} {row['exact_match']:>12.1%}")
    lines.append(f"reload through PeftModel.from_pretrained exact: {report['reload_exact']}")
    lines.append(f"adapter: {report['adapter_dir']}  ({report['total_seconds']:.0f} s in all)")
    return "\n".join(lines)
