"""Memory store: add throughput and search latency (BM25, top 5) as the store grows to 100 and 10,000 memories.

Every memory registers a saved log-gate controller of a tiny model (``configs/tiny-llama.json``). The first adds use
distinct adapter folders (each copied, hashed and checked); the rest reuse a few of them, so the large store measures
the database and index, not the copying of thousands of folders. Search queries are two words of the vocabulary.

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
from peft import get_peft_model
from timing import environment, result_path

from peft_ext import GateConfig
from peft_ext.io import write_json
from peft_ext.memory import MemoryStore
from peft_ext.provenance import fingerprint, write_provenance
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
    write_json(args.out, report)
    print(f"{'memories':>9}{'adds/s':>9}{'search median ms':>18}{'IQR ms':>8}{'audit s':>9}")
    for size, row in report["sizes"].items():
        print(f"{size:>9}{row['adds_per_second']:>9.1f}{row['search']['median_ms']:>18.2f}"
              f"{row['search']['iqr_ms']:>8.2f}{row['audit_seconds']:>9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
