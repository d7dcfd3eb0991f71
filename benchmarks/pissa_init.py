"""Modulated PiSSA initialisation time on one 896x4864 weight (Qwen2.5-0.5B's down_proj): SVD vs SVD-cache hit.

Times ``get_peft_model`` plus the first forward (where the deferred SVD runs), median of ``--repeats`` runs each.

    python benchmarks/pissa_init.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from peft import get_peft_model
from torch import nn

from timing import environment, result_path

from peft_ext import ModulatedPissaConfig
from peft_ext.io import write_json


class DownProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Linear(4864, 896, bias=False)

    def forward(self, x):
        return self.down_proj(x)


def init_seconds(weight: torch.Tensor, cache_dir: str | None) -> float:
    model = DownProj()
    model.down_proj.weight.data.copy_(weight)
    start = time.perf_counter()
    peft_model = get_peft_model(model, ModulatedPissaConfig(r=16, target_modules=["down_proj"], svd_cache_dir=cache_dir))
    peft_model(torch.zeros(1, 4864))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=result_path("pissa_init"))
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(896, 4864) / 4864**0.5
    with tempfile.TemporaryDirectory() as cache:
        no_cache = [init_seconds(weight, None) for _ in range(args.repeats)]
        first = init_seconds(weight, cache)  # computes and writes the cache file
        hits = [init_seconds(weight, cache) for _ in range(args.repeats)]
    report = {**environment("cpu"), "dtype": "float32", "seed": 0, "weight_shape": [896, 4864],
              "svd_seconds": no_cache, "cache_write_seconds": first, "cache_hit_seconds": hits,
              "median_svd_seconds": statistics.median(no_cache), "median_cache_hit_seconds": statistics.median(hits)}
    write_json(args.out, report)
    print(f"896x4864 PiSSA init, r=16, {report['threads']} threads: full SVD {report['median_svd_seconds']:.3f} s, "
          f"cache hit {report['median_cache_hit_seconds']:.3f} s (first write {first:.3f} s); wrote {args.out}")


if __name__ == "__main__":
    main()
