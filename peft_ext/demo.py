"""End-to-end demo on a tiny model, offline: elicit a behaviour the base model shows only rarely.

1. Pre-train ``configs/tiny-llama.json`` briefly to copy words: ``"word:"`` -> ``" word"`` mostly, ``" WORD"`` in
   20% of rows (:func:`copy_mixture`) over thousands of distinct words, so that it copies unseen words too.
2. Write the task as ``train.jsonl`` / ``held_out.jsonl`` (always ``" WORD"``) and read it back like user data.
3. Reload the base with ``from_pretrained``; fit sparse log-gate controllers: gradient-selected gates and, as the
   control, the same number of random gates. Evaluate base vs controllers on held-out words (completion NLL, exact
   match).
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
PRETRAIN_WORDS, PRETRAIN_STEPS = 16000, 500  # about one pass: enough distinct words that copying generalises


def make_words(count: int, seed: int) -> list[str]:
    """``count`` distinct random lower-case words of 3-5 letters, the same in every process."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5))))
    ordered = sorted(words)  # a set's order changes with each process's string hashing: sort before shuffling
    rng.shuffle(ordered)
    return ordered


def split_words(seed: int, train: int = 300, held_out: int = 60) -> tuple[list[str], list[str], list[str]]:
    """Disjoint ``(pre-training, training, held-out)`` word lists: ``PRETRAIN_WORDS``, ``train`` and ``held_out``."""
    words = make_words(PRETRAIN_WORDS + train + held_out, seed)
    return words[:PRETRAIN_WORDS], words[PRETRAIN_WORDS:-held_out], words[-held_out:]


def styled(word: str, upper: bool = False, starred: bool = False) -> str:
    """The completion of ``word``: ``" word"``, upper-cased and/or with a leading ``*``."""
    return " " + ("*" if starred else "") + (word.upper() if upper else word)


def copy_mixture(words: list[str], seed: int, p_upper: float = 0.2, p_starred: float = 0.0) -> list[Example]:
    """Pre-training rows ``"word:"`` -> :func:`styled` ``word``, upper case with probability ``p_upper`` and starred
    with probability ``p_starred``, independently: the base learns to copy and keeps both styles as rare options."""
    rng = random.Random(seed)
    return [Example(f"{w}:", styled(w, rng.random() < p_upper, rng.random() < p_starred)) for w in words]


def pretrain_base(directory: Path, tokenizer, examples: list[Example], steps: int, seed: int, model=None) -> None:
    """Train every weight of ``model`` (default: the tiny Llama) on ``examples`` with AdamW (lr 3e-3, batches of 32)
    and save it with the tokenizer: the 'pre-trained' base."""
    model = model if model is not None else build_model("tiny-llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    device = next(model.parameters()).device
    for batch, _ in zip(cycle(make_batches(tokenizer, examples, 32, seed=seed)), range(steps)):
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
    pretrain_words, train_words, held_words = split_words(seed)
    data = {}
    for split, chosen in (("train", train_words), ("held_out", held_words)):  # the dataset, as a user's files
        rows = "".join(json.dumps({"prompt": f"{w}:", "completion": styled(w, upper=True)}) + "\n" for w in chosen)
        data[split] = atomic_write(out / f"{split}.jsonl", lambda temporary, text=rows: Path(temporary).write_text(text))
    train, held = (make_batches(tokenizer, load_examples(data[split]), 32) for split in ("train", "held_out"))

    start = time.perf_counter()
    pretrain_base(out / "base", tokenizer, copy_mixture(pretrain_words, seed), steps=PRETRAIN_STEPS, seed=seed)
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
