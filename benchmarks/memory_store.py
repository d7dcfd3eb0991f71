"""Memory store: add throughput and search latency (BM25, top 5) as the store grows to 100 and 10,000 memories, and
the forward-time cost of serving memories with :class:`~peft_ext.serving.MemoryServer`.

Every memory registers a saved log-gate controller of a tiny model (``configs/tiny-llama.json``). The first adds use
distinct adapter folders (each copied, hashed and checked); the rest reuse a few of them, so the large store measures
the database and index, not the copying of thousands of folders. Search queries are two words of the vocabulary.

Serving: the 512-wide 8-block Llama of ``overhead.py``, batches of 4 x 128 and 1 x 8 tokens, fp32, forward without
gradients, interleaved repetitions in one process. Variants: the base model (a second copy without hooks); the served
model with nothing attached (every hook returns ``None``); the served model with a dense log-gate memory or a
modulated-LoRA r8 all-linear memory attached; and, for reference, the same two adapters applied by their PEFT tuners.

    python benchmarks/memory_store.py --quick      # 100 and 2,000 memories
    python benchmarks/memory_store.py              # 100 and 10,000 memories
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from timing import environment, interleaved, result_path, summarize
from overhead import base_config
from transformers import AutoModelForCausalLM

from peft_ext import GateConfig, ModulatedLoraConfig
from peft_ext.io import write_json
from peft_ext.memory import MemoryStore
from peft_ext.provenance import fingerprint, write_provenance
from peft_ext.serving import MemoryServer
from peft_ext.tiny import build_model

WORDS = [f"{a}{b}" for a in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
         for b in ("river", "stone", "cloud", "forest", "engine", "garden", "signal", "market", "winter", "harbor")]
DISTINCT_ADAPTERS = 20


def make_adapters(root: Path) -> list[Path]:
    base = build_model("tiny-llama")
    base_fingerprint = fingerprint(base)
    folders = []
    for i in range(DISTINCT_ADAPTERS):
        torch.manual_seed(i)
        folder = root / f"adapter{i}"
        get_peft_model(build_model("tiny-llama"), GateConfig(init="random")).save_pretrained(folder)
        write_provenance(folder, base_fingerprint, "tiny-llama")
        folders.append(folder)
    return folders


def search_latency(store: MemoryStore, rng: random.Random, repeats: int) -> dict:
    samples = []
    for _ in range(repeats):
        query = " ".join(rng.sample(WORDS, 2))
        start = time.perf_counter()
        store.search(query, "bench", k=5)
        samples.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(samples, n=4)
    return {"median_ms": statistics.median(samples) * 1e3, "iqr_ms": (quartiles[2] - quartiles[0]) * 1e3,
            "repeats": repeats}


SERVING_INPUTS = ((4, 128), (1, 8))  # (batch, tokens): a prefill-sized batch and a latency-bound short one


def serving_overhead(workdir: Path, repeats: int) -> dict:
    """Forward medians and ratios to the base model of the served model, empty and with one memory attached."""
    config = base_config("small")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "serving-base")
    load = lambda: AutoModelForCausalLM.from_pretrained(workdir / "serving-base").eval()  # noqa: E731
    base_fingerprint = fingerprint(load())
    store = MemoryStore(workdir / "serving-store")
    adapters, items = {}, {}
    for name, adapter_config in (("gates", GateConfig(init="random")),
                                 ("mlora", ModulatedLoraConfig(r=8, init_b="random"))):
        torch.manual_seed(1)
        adapters[name] = workdir / f"serving-{name}"
        get_peft_model(load(), adapter_config).save_pretrained(adapters[name])
        write_provenance(adapters[name], base_fingerprint, "serving-base")
        items[name] = store.add("serve", f"{name} memory", adapters[name])
    server = MemoryServer(load(), store, "serve")

    def attached(memory):
        def forward(**inputs):
            with server.attached(memory):
                return server.model(**inputs)
        return forward

    models = {"base": load(), "served, nothing attached": server.model}
    for name, item in items.items():
        models[f"served, {name} attached"] = attached(server.compose([item], [1.0]))
        models[f"PEFT tuner, {name}"] = PeftModel.from_pretrained(load(), adapters[name]).eval()
    forward = {}
    for batch, length in SERVING_INPUTS:
        ids = torch.randint(4, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
        forward[f"{batch} x {length}"] = summarize(interleaved(models, ids, repeats), {"base": "base"})
    shape = {key: getattr(config, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads")}
    return {"shape": shape, "repeats": repeats, "hooks": len(server._hooks), "forward": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=result_path("memory_store"))
    args = parser.parse_args()
    sizes = (100, 2000) if args.quick else (100, 10000)
    rng = random.Random(0)
    report = {**environment("cpu"), "dtype": "float32", "seed": 0, "sizes": {}, "distinct_adapters": DISTINCT_ADAPTERS}
    with tempfile.TemporaryDirectory() as workdir:
        adapters = make_adapters(Path(workdir))
        store = MemoryStore(Path(workdir) / "store")
        added = 0
        for size in sizes:
            start = time.perf_counter()
            for i in range(added, size):
                text = " ".join(rng.sample(WORDS, 6))
                store.add("bench", text, adapters[i % DISTINCT_ADAPTERS], tags=[rng.choice(WORDS)])
            seconds = time.perf_counter() - start
            report["sizes"][size] = {"adds": size - added, "add_seconds": seconds,
                                     "adds_per_second": (size - added) / seconds,
                                     "search": search_latency(store, rng, 200)}
            added = size
            start = time.perf_counter()
            audit = store.audit()
            report["sizes"][size].update(audit_ok=audit["ok"], audit_seconds=time.perf_counter() - start)
        report["serving"] = serving_overhead(Path(workdir), repeats=30 if args.quick else 100)
    write_json(args.out, report)
    print(f"{'memories':>9}{'adds/s':>9}{'search median ms':>18}{'IQR ms':>8}{'audit s':>9}")
    for size, row in report["sizes"].items():
        print(f"{size:>9}{row['adds_per_second']:>9.1f}{row['search']['median_ms']:>18.2f}"
              f"{row['search']['iqr_ms']:>8.2f}{row['audit_seconds']:>9.2f}")
    serving = report["serving"]
    for inputs, rows in serving["forward"].items():
        print(f"serving, forward of {inputs} tokens ({serving['hooks']} hooks, {serving['repeats']} repetitions):")
        print(f"{'variant':<28}{'median ms':>10}{'IQR ms':>8}{'x base':>8}")
        for name, row in rows.items():
            print(f"{name:<28}{row['median_ms']:>10.2f}{row['iqr_ms']:>8.2f}{row['ratio_to_base']:>8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
