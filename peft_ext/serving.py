"""Serve memories request by request on one base model: retrieve, compose, attach for the request only, detach.

:class:`MemoryServer` puts forward hooks on the decoder blocks and linear layers of a plain base model once. Each hook
reads the memory attached to the *current request* from a ``ContextVar``: threads (and asyncio tasks) have their own
context, so two requests served at the same time on one model never see each other's memories, and with nothing
attached every hook returns ``None`` and the model is the base model, bit for bit.

Composition of the retrieved memories (weights 1, or score / best score with ``weighting="score"``):

- log-gate controllers: ``s = clip(Σ wᵢ sᵢ, ±budget)`` per block (``budget``: the largest ``max_log_gate``), applied
  as ``h' = exp(s) ⊙ h`` in fp32, the same function the gate tuner uses;
- low-rank adapters (modulated LoRA/PiSSA, PEFT LoRA, bakes): ``y + Σ wᵢ ΔWᵢ x`` as one stacked pair ``B(Ax)`` per
  module (the bake's folding, uncompressed).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .bake import BAKEABLE_TYPES, fold_round, stack_rounds
from .compose import saved_gate_values
from .data import evaluate, make_batches
from .loading import SavedAdapter, read_adapter_files
from .memory import MemoryStore, MemoryStoreError
from .provenance import fingerprint
from .tuners.common import ADAPTER_DTYPE, find_decoder_blocks
from .tuners.loggate.layer import apply_log_gate

WEIGHTINGS = ("uniform", "score")


@dataclass
class ComposedMemory:
    """What one request attaches: log-gates per block path and ``(A, B)`` per linear module path (fp32)."""

    memories: list[dict]
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class MemoryServer:
    """A base model serving memories from a :class:`~peft_ext.memory.MemoryStore`, one request at a time per thread."""

    def __init__(self, model: nn.Module, store: MemoryStore, namespace: Optional[str] = None, k: int = 3,
                 weighting: str = "uniform", budget: Optional[float] = None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: choose one of {WEIGHTINGS}")
        self.model, self.store, self.namespace, self.k = model, store, namespace, k
        self.weighting, self.budget = weighting, budget
        self.fingerprint = fingerprint(model)  # also refuses a model that already has adapters
        self._attached: ContextVar[Optional[ComposedMemory]] = ContextVar(f"memory-{id(self)}", default=None)
        self._cache: dict[str, SavedAdapter] = {}
        path, blocks = find_decoder_blocks(model)
        self._hidden_size = model.config.get_text_config().hidden_size
        self._hooks = [block.register_forward_hook(self._gate_hook(f"{path}.{i}")) for i, block in enumerate(blocks)]
        self._hooks += [module.register_forward_hook(self._delta_hook(name))
                        for name, module in model.named_modules() if isinstance(module, nn.Linear)]

    def close(self) -> None:
        """Remove the hooks: the model is the plain base model again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- hooks ------------------------------------------------------------------------------------------------------
    def _gate_hook(self, name: str):
        def hook(module, args, output):
            memory = self._attached.get()
            log_gate = memory.gates.get(name) if memory is not None else None
            return None if log_gate is None else apply_log_gate(output, log_gate, self._hidden_size, name)

        return hook

    def _delta_hook(self, name: str):
        def hook(module, args, output):
            memory = self._attached.get()
            factors = memory.deltas.get(name) if memory is not None else None
            if factors is None:
                return None
            a, b = factors
            return output + ((args[0].to(ADAPTER_DTYPE) @ a.T) @ b.T).to(output.dtype)

        return hook

    # -- composing --------------------------------------------------------------------------------------------------
    def _adapter(self, item: dict) -> SavedAdapter:
        digest = item["adapter_sha256"]
        if digest not in self._cache:
            self._cache[digest] = read_adapter_files(self.store.validate_adapter(digest))
        return self._cache[digest]

    def compose(self, memories: Sequence[dict], weights: Sequence[float]) -> ComposedMemory:
        """The request's composition of ``memories`` (store items) at ``weights``; refuses another base model's."""
        device = next(self.model.parameters()).device
        composed = ComposedMemory(memories=[{"id": m["id"], "version": m["version"], "text": m["text"],
                                             "score": m.get("score"), "weight": w} for m, w in zip(memories, weights)])
        bounds, kept = [], []
        for memory, weight in zip(memories, weights):
            if memory["base_fingerprint"] != self.fingerprint:
                raise MemoryStoreError(f"memory {memory['id']} was fitted to another base model "
                                       f"({memory['base_model']!r}); it cannot be attached to this one")
            saved = self._adapter(memory)
            if saved.peft_type == "LOGGATE":
                blocks, gates, _ = saved_gate_values(saved, ADAPTER_DTYPE)
                bounds.append(float(saved.config.get("max_log_gate", 0.05)))
                for name, log_gate in zip(blocks, gates):
                    total = composed.gates.get(name, torch.zeros_like(log_gate))
                    composed.gates[name] = total + weight * log_gate
            elif saved.peft_type in BAKEABLE_TYPES:
                kept.append(fold_round(memory["id"], saved.config, saved.tensors, weight))
            else:
                raise MemoryStoreError(f"memory {memory['id']} is a {saved.peft_type} adapter, which cannot be served")
        budget = self.budget if self.budget is not None else max(bounds, default=0.0)
        composed.gates = {name: s.clamp(-budget, budget).to(device) for name, s in composed.gates.items()}
        if kept:
            stacked, _ = stack_rounds(kept, compress=False)
            composed.deltas = {name: (a.to(device), b.to(device)) for name, (a, b) in stacked.items()}
        return composed

    def retrieve(self, query: str) -> ComposedMemory:
        """Search the store for ``query`` and compose the top-``k`` hits (an empty composition when none match)."""
        hits = self.store.search(query, self.namespace, self.k)
        if self.weighting == "score" and hits:
            weights = [hit["score"] / hits[0]["score"] for hit in hits]
        else:
            weights = [1.0] * len(hits)
        return self.compose(hits, weights)

    @contextmanager
    def attached(self, memory: Optional[ComposedMemory]):
        """Inside the block, this thread's forwards use ``memory`` (``None``: the base model)."""
        token = self._attached.set(memory if memory is None or memory.memories else None)
        try:
            yield
        finally:
            self._attached.reset(token)

    # -- requests ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _used(memory: ComposedMemory) -> dict:
        if not memory.memories:
            return {"memories": [], "fallback": "no memory matched the query; the base model answered"}
        return {"memories": memory.memories, "fallback": None}

    def generate(self, tokenizer, query: str, prompt: Optional[str] = None, max_new_tokens: int = 32) -> dict:
        """Greedy completion of ``prompt`` (default: the query) with the memories retrieved for ``query``."""
        memory = self.retrieve(query)
        prompt = query if prompt is None else prompt
        encoded = tokenizer(prompt, return_tensors="pt").to(next(self.model.parameters()).device)
        with torch.no_grad(), self.attached(memory):
            generated = self.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"query": query, "prompt": prompt, "completion": completion, **self._used(memory)}

    def evaluate(self, tokenizer, examples: Sequence, query: Optional[str] = None) -> dict:
        """Completion NLL and exact match with the memories retrieved per example (query: its prompt, or ``query``),
        next to the base model's on the same examples."""
        rows, totals = [], {"memory": [0.0, 0, 0], "base": [0.0, 0, 0]}
        for example in examples:
            memory = self.retrieve(query or example.prompt)
            batch = make_batches(tokenizer, [example], 1)
            with self.attached(memory):
                with_memory = evaluate(self.model, batch)
            base = evaluate(self.model, batch)
            for label, result in (("memory", with_memory), ("base", base)):
                totals[label][0] += result["nll"] * result["tokens"]
                totals[label][1] += result["tokens"]
                totals[label][2] += int(result["exact_match"] == 1.0)
            rows.append({"prompt": example.prompt, "nll": with_memory["nll"], "base_nll": base["nll"],
                         **self._used(memory)})
        summary = {label: {"nll": nll / tokens, "exact_match": exact / len(examples)}
                   for label, (nll, tokens, exact) in totals.items()}
        return {"examples": len(examples), **summary, "rows": rows}
