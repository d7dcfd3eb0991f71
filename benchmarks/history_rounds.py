"""Three training rounds on a tiny model, each kept in a history bake while the next round trains on top.

The base is the demo's: ``configs/tiny-llama.json`` pre-trained briefly to copy words after ``:``, in upper case in 20%
of rows (``peft_ext.demo.copy_mixture``). Round 1 steers ``word:`` to `` WORD``, round 2 teaches ``word=`` ->
`` word``, round 3 ``word;`` -> `` WORD``. Round k trains a modulated LoRA adapter on top of the bake of rounds
1..k-1 with completion NLL plus ``kl_weight`` times KL(reference || model) on the earlier rounds' prompts, the
reference being ``peft_ext.reference(model, include_history=True)``. The round is saved alone and appended to the
bake. The table gives held-out exact match of every task after every round, for the run with the KL term and for the
same run without it.

    python benchmarks/history_rounds.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from timing import environment, result_path

from peft_ext import ModulatedLoraConfig, add_round, bake, reference
from peft_ext.data import Example, cycle, evaluate, make_batches
from peft_ext.demo import PRETRAIN_STEPS, copy_mixture, pretrain_base, split_words
from peft_ext.io import write_json
from peft_ext.tiny import char_tokenizer

TASKS = {  # round name: (prompt separator, completion of a word)
    "upper after ':'": (":", str.upper),
    "echo after '='": ("=", lambda word: word),
    "upper after ';'": (";", str.upper),
}


def kl_to_history(model, batch: dict) -> torch.Tensor:
    """Mean KL(reference || model) over the completion positions of ``batch``; the reference keeps the history."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), reference(model, include_history=True):
        target = model(**inputs).logits[:, :-1].log_softmax(-1)
    predicted = model(**inputs).logits[:, :-1].log_softmax(-1)
    completion = batch["labels"][:, 1:] != -100
    return F.kl_div(predicted, target, log_target=True, reduction="none").sum(-1)[completion].mean()


def train_round(model, task_batches: list[dict], retain_batches: list[dict], steps: int, lr: float,
                kl_weight: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    retain = cycle(retain_batches) if retain_batches and kl_weight > 0 else None
    for _, batch in zip(range(steps), cycle(task_batches)):
        loss = model(**batch).loss
        if retain is not None:
            loss = loss + kl_weight * kl_to_history(model, next(retain))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def run(workdir: Path, steps: int = 120, lr: float = 1e-2, kl_weight: float = 1.0, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    pretrain_words, train_words, held_words = split_words(seed)  # the demo's split

    def batches(task: str, chosen: list[str]) -> list[dict]:
        separator, complete = TASKS[task]
        return make_batches(tokenizer, [Example(f"{w}{separator}", " " + complete(w)) for w in chosen], 32)

    train = {task: batches(task, train_words) for task in TASKS}
    held = {task: batches(task, held_words) for task in TASKS}
    pretrain_base(workdir / "base", tokenizer, copy_mixture(pretrain_words, seed), steps=PRETRAIN_STEPS, seed=seed)
    load = lambda: AutoModelForCausalLM.from_pretrained(workdir / "base").eval()  # noqa: E731
    accuracy = lambda model: {task: evaluate(model, held[task])["exact_match"] for task in TASKS}  # noqa: E731
    report = {"steps": steps, "lr": lr, "kl_weight": kl_weight, "seed": seed, "base": accuracy(load()), "runs": {}}

    for label, weight in (("with KL to the history", kl_weight), ("without KL", 0.0)):
        history_dir, rows = None, []
        for index, task in enumerate(TASKS):
            config = ModulatedLoraConfig(r=8, alpha=16.0)
            if history_dir is None:
                model = get_peft_model(load(), config)
            else:
                model = add_round(PeftModel.from_pretrained(load(), history_dir), config)
            retain = [b for earlier in list(TASKS)[:index] for b in train[earlier]]
            train_round(model, train[task], retain, steps, lr, weight)
            round_dir = workdir / label / f"round{index + 1}"
            model.save_pretrained(round_dir)
            kept = ([(str(history_dir), 1.0)] if history_dir is not None else []) + [(str(round_dir), 1.0)]
            history = bake(load(), kept)
            history_dir = workdir / label / f"bake{index + 1}"
            history.save_pretrained(history_dir)
            ranks = history.peft_config["default"].ranks.values()
            rows.append({"after_round": index + 1, "trained": task, "exact_match": accuracy(history),
                         "bake_max_rank": max(ranks)})
        report["runs"][label] = rows
    return report


def format_table(report: dict) -> str:
    header = f"{'':<46}" + "".join(f"{task:>18}" for task in TASKS)
    lines = [header, f"{'base':<46}" + "".join(f"{report['base'][t]:>18.1%}" for t in TASKS)]
    for label, rows in report["runs"].items():
        for row in rows:
            name = f"{label}, bake of rounds 1-{row['after_round']}"
            lines.append(f"{name:<46}" + "".join(f"{row['exact_match'][t]:>18.1%}" for t in TASKS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=result_path("history_rounds"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        report = run(Path(workdir), steps=args.steps, kl_weight=args.kl_weight, seed=args.seed)
    write_json(args.out, {**environment("cpu"), "dtype": "float32", **report})
    print(format_table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
