"""Prompt/completion data: joint tokenisation with completion-only labels, padding, and batching.

Prompt and completion are tokenised together (so the boundary tokenises as the model will see it); the label mask
comes from lengths (character offsets where the tokenizer provides them), never from ``ids != pad``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return pad_id


def tokenize_example(tokenizer, example: Example, max_length: int | None = None, add_eos: bool = True) -> dict:
    """``input_ids`` and ``labels`` (``-100`` on prompt tokens) for one example, special tokens as the tokenizer adds."""
    if not example.completion:
        raise ValueError(f"empty completion for prompt {example.prompt[:40]!r}: nothing to supervise")
    text = example.prompt + example.completion
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
    ids = list(encoding["input_ids"])
    if tokenizer.is_fast:
        # a token belongs to the completion when it ends after the prompt; special tokens have empty offsets (0, 0)
        boundary = len(example.prompt)
        is_completion = [end > boundary for _, end in encoding["offset_mapping"]]
    else:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"prompt {example.prompt[:40]!r} does not tokenise as a prefix; use a fast tokenizer")
        is_completion = [i >= len(prompt_ids) for i in range(len(ids))]
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        is_completion.append(True)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example has {len(ids)} tokens > max_length={max_length}: {text[:60]!r}")
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, is_completion)]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"completion {example.completion[:40]!r} produced no supervised tokens")
    return {"input_ids": ids, "labels": labels}


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to one batch; ``attention_mask`` from each row's length."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_batches(tokenizer, examples: Sequence[Example], batch_size: int, max_length: int | None = None) -> list[dict]:
    """Tokenise and collate ``examples`` into fixed batches (in order)."""
    rows = [tokenize_example(tokenizer, example, max_length) for example in examples]
    pad_id = _pad_id(tokenizer)
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def cycle(batches: Sequence[dict]) -> Iterator[dict]:
    while True:
        yield from batches


@torch.no_grad()
def evaluate(model, batches: Sequence[dict]) -> dict:
    """Teacher-forced completion metrics: token-weighted ``nll``, ``token_accuracy`` and ``exact_match``.

    ``exact_match`` counts examples whose every completion token is the argmax under teacher forcing, which is exactly
    when greedy decoding reproduces the completion.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens, correct, exact, examples = 0.0, 0, 0, 0, 0
    try:
        for batch in batches:
            batch = to_device(batch, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            logits = logits[:, :-1]
            supervised = targets != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            hits = (logits.argmax(-1) == targets) & supervised
            nll_sum += float(nll)
            tokens += int(supervised.sum())
            correct += int(hits.sum())
            exact += int(((hits | ~supervised).all(dim=1)).sum())
            examples += targets.shape[0]
    finally:
        model.train(was_training)
    return {"nll": nll_sum / tokens, "token_accuracy": correct / tokens, "exact_match": exact / examples,
            "tokens": tokens, "examples": examples}
