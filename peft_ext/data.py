"""Prompt/completion data: JSONL reading, joint tokenisation with completion-only labels, padding, and batching.

Prompt and completion are tokenised together (so the boundary tokenises as the model will see it); the label mask
comes from lengths (character offsets where the tokenizer provides them), never from ``ids != pad``. A text that
already starts with the tokenizer's BOS (as chat templates render it) gets no second one.

JSONL rows, one object per line: ``{"prompt", "completion"}``, ``{"instruction", "response"}`` (optional
``"input"``), ``{"question", "answer"}``, ``{"text"}`` (every token supervised), ``{"messages": [...]}`` (the final
assistant turn supervised), and for evaluation multiple choice ``{"prompt" | "question", "choices": [...],
"answer": index or choice}``. A bad row is a :class:`DataError` naming ``file:line``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHAT_TEMPLATES = ("auto", "none")
PAIR_FIELDS = (("prompt", "completion"), ("instruction", "response"), ("question", "answer"))


class DataError(ValueError):
    """A data row that cannot be used; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    source: str = field(default="", compare=False)  # "file:line" for error messages


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice row: ``prompt`` followed by each of ``choices``; ``answer`` is the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    source: str = field(default="", compare=False)


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """``[(file:line, row), ...]`` of the non-blank lines of ``path``; each must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_prompt(tokenizer, messages, where: str, chat_template: str) -> tuple[str, str]:
    """``(prompt, completion)`` of a conversation whose last turn is the assistant's (the supervised part)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for turn in messages:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: every message needs string 'role' and 'content', got {turn!r:.80}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is what gets supervised), "
                        f"got role {messages[-1]['role']!r}")
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise DataError(f"{where}: the tokenizer's chat template does not render the conversation as the prompt "
                            "followed by the assistant turn; use --chat-template none")
        return prompt, full[len(prompt):]
    history = "".join(f"{turn['role']}: {turn['content']}\n" for turn in messages[:-1])
    return history + "assistant: ", messages[-1]["content"]


def example_from_row(row: dict, where: str, tokenizer=None, chat_template: str = "auto") -> Example:
    """One training/evaluation :class:`Example` from a JSONL row in any supported format."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template={chat_template!r}: choose one of {CHAT_TEMPLATES}")
    if "messages" in row:
        prompt, completion = _chat_prompt(tokenizer, row["messages"], where, chat_template)
        return Example(prompt, completion, where)
    for prompt_key, completion_key in PAIR_FIELDS:
        if prompt_key in row and completion_key in row and "choices" not in row:
            prompt = _text(row, prompt_key, where)
            if prompt_key == "instruction" and row.get("input"):
                prompt = f"{prompt}\n{_text(row, 'input', where)}"
            return Example(prompt, _text(row, completion_key, where), where)
    if "text" in row:
        return Example("", _text(row, "text", where), where)
    raise DataError(f"{where}: unknown row format with keys {sorted(row)}; expected prompt/completion, "
                    "instruction/response, question/answer, text or messages")


def choice_from_row(row: dict, where: str) -> ChoiceExample:
    prompt_key = "prompt" if "prompt" in row else "question"
    if prompt_key not in row or "choices" not in row or "answer" not in row:
        raise DataError(f"{where}: a multiple-choice row needs 'prompt' (or 'question'), 'choices' and 'answer'")
    choices = row["choices"]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    answer = row["answer"]
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{where}: answer {answer!r} is not one of the choices")
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be a choice or an index in [0, {len(choices)})")
    return ChoiceExample(_text(row, prompt_key, where), tuple(choices), answer, where)


def load_examples(path: str | Path, tokenizer=None, chat_template: str = "auto") -> list[Example]:
    """Every row of a JSONL file as an :class:`Example` (see the module docstring for the formats)."""
    return [example_from_row(row, where, tokenizer, chat_template) for where, row in read_jsonl(path)]


def load_eval_rows(path: str | Path, tokenizer=None, chat_template: str = "auto") -> list[Example] | list[ChoiceExample]:
    """Examples, or multiple-choice rows when the file's rows have ``choices`` (a file holds one kind)."""
    rows = read_jsonl(path)
    kinds = {"choices" in row for _, row in rows}
    if len(kinds) > 1:
        where = next(where for where, row in rows if ("choices" in row) != ("choices" in rows[0][1]))
        raise DataError(f"{where}: the file mixes multiple-choice rows with plain rows; put them in separate files")
    if kinds == {True}:
        return [choice_from_row(row, where) for where, row in rows]
    return [example_from_row(row, where, tokenizer, chat_template) for where, row in rows]


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _pad_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return pad_id


def tokenize_example(tokenizer, example: Example, max_length: int | None = None, add_eos: bool = True) -> dict:
    """``input_ids`` and ``labels`` (``-100`` on prompt tokens) for one example, special tokens as the tokenizer adds."""
    try:
        return _tokenize(tokenizer, example, max_length, add_eos)
    except ValueError as error:
        if example.source and not isinstance(error, DataError):
            raise DataError(f"{example.source}: {error}") from None
        raise


def _tokenize(tokenizer, example: Example, max_length: int | None, add_eos: bool) -> dict:
    if not example.completion:
        raise ValueError(f"empty completion for prompt {example.prompt[:40]!r}: nothing to supervise")
    text = example.prompt + example.completion
    # a chat template already wrote the BOS into the text; do not add a second one
    special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    encoding = tokenizer(text, add_special_tokens=special, return_offsets_mapping=tokenizer.is_fast)
    ids = list(encoding["input_ids"])
    if tokenizer.is_fast:
        # a token belongs to the completion when it ends after the prompt; special tokens have empty offsets (0, 0)
        boundary = len(example.prompt)
        is_completion = [end > boundary for _, end in encoding["offset_mapping"]]
    else:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=special)["input_ids"]
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


def make_batches(tokenizer, examples: Sequence[Example], batch_size: int, max_length: int | None = None,
                 seed: int | None = None) -> list[dict]:
    """Tokenise and collate ``examples`` into fixed batches: in order, or shuffled by ``seed`` when given."""
    rows = [tokenize_example(tokenizer, example, max_length) for example in examples]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    pad_id = _pad_id(tokenizer)
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def cycle(batches: Sequence[dict]) -> Iterator[dict]:
    while True:
        yield from batches


def _row_scores(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed completion NLL, supervised token count, and whether every completion token is the argmax."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
    hits = (logits.argmax(-1) == targets) & supervised
    return nll, supervised.sum(1), hits.sum(1), (hits | ~supervised).all(dim=1)


@torch.no_grad()
def _scored_rows(model, batches: Sequence[dict]) -> Iterator[tuple[torch.Tensor, ...]]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            yield tuple(t.cpu() for t in _row_scores(model, to_device(batch, device)))
    finally:
        model.train(was_training)


def evaluate(model, batches: Sequence[dict]) -> dict:
    """Teacher-forced completion metrics: token-weighted ``nll``, ``token_accuracy`` and ``exact_match``.

    ``exact_match`` counts examples whose every completion token is the argmax under teacher forcing, which is exactly
    when greedy decoding reproduces the completion.
    """
    nll_sum, tokens, correct, exact, examples = 0.0, 0, 0, 0, 0
    for nll, count, hits, all_hit in _scored_rows(model, batches):
        nll_sum += float(nll.sum())
        tokens += int(count.sum())
        correct += int(hits.sum())
        exact += int(all_hit.sum())
        examples += len(nll)
    return {"nll": nll_sum / tokens, "token_accuracy": correct / tokens, "exact_match": exact / examples,
            "tokens": tokens, "examples": examples}


def evaluate_choices(model, tokenizer, rows: Sequence[ChoiceExample], batch_size: int = 16) -> dict:
    """Multiple choice by length-normalised NLL: the predicted choice has the lowest NLL per choice token.

    Each ``prompt + choice`` is tokenised jointly (no EOS: a choice is a continuation). Returns ``accuracy`` and the
    mean normalised NLL of the right choice (``answer_nll``).
    """
    pairs = [Example(row.prompt, choice, row.source) for row in rows for choice in row.choices]
    tokenized = [tokenize_example(tokenizer, pair, add_eos=False) for pair in pairs]
    pad_id = _pad_id(tokenizer)
    batches = [collate(tokenized[i : i + batch_size], pad_id) for i in range(0, len(tokenized), batch_size)]
    normalised = torch.cat([nll / count for nll, count, _, _ in _scored_rows(model, batches)]).tolist()
    correct, answer_nll, start = 0, 0.0, 0
    for row in rows:
        scores = normalised[start : start + len(row.choices)]
        start += len(row.choices)
        correct += int(min(range(len(scores)), key=scores.__getitem__) == row.answer)
        answer_nll += scores[row.answer]
    return {"accuracy": correct / len(rows), "answer_nll": answer_nll / len(rows), "examples": len(rows)}
