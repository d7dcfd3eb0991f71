"""Gate selection: time and stability against the number of scored batches.

On the 512-wide 8-block model of ``overhead.py`` (4,096 gates; batches of 8 x 64 random tokens), ``select_gates``
keeps 5% of the gates by ``|Σ dL/ds|`` over 1, 2, 4, 8, 16 and 32 batches. Reported: seconds (median of 3 runs), and
the overlap (Jaccard) of each selection with the one from 32 batches, which shows how many batches the scores need
to settle.

    python benchmarks/selection_scaling.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from overhead import base_config
from peft import get_peft_model
from timing import environment, result_path
from transformers import AutoModelForCausalLM

from peft_ext import GateConfig, select_gates
from peft_ext.io import write_json

BATCH_COUNTS = (1, 2, 4, 8, 16, 32)


def selection(model_state, config, batches, count: int, device: str) -> tuple[float, torch.Tensor]:
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(model_state)
    model.to(device)
    num_gates = config.num_hidden_layers * config.hidden_size // 20
    peft = get_peft_model(model.eval(), GateConfig(num_gates=num_gates))
    start = time.perf_counter()
    select_gates(peft, batches, score_batches=count, progress=False)
    seconds = time.perf_counter() - start
    mask = torch.cat([t.cpu() for name, t in sorted(peft.state_dict().items()) if "loggate_mask" in name])
    return seconds, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=result_path("selection_scaling"))
    args = parser.parse_args()
    config = base_config("small")
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(max(BATCH_COUNTS)):
        ids = torch.randint(4, 100, (8, 64), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    masks, rows = {}, {}
    for count in BATCH_COUNTS:
        timings = []
        for _ in range(args.repeats):
            seconds, masks[count] = selection(state, config, batches, count, args.device)
            timings.append(seconds)
        rows[count] = {"median_seconds": statistics.median(timings), "samples_seconds": timings}
    reference = masks[max(BATCH_COUNTS)]
    for count, row in rows.items():
        row["jaccard_with_32"] = float((masks[count] & reference).sum() / (masks[count] | reference).sum())
    write_json(args.out, {**environment(args.device), "dtype": "float32", "seed": 0, "gates": int(reference.sum()),
                          "capacity": reference.numel(), "batch": [8, 64], "rows": rows})
    print(f"{'batches':>8}{'seconds':>10}{'Jaccard vs 32':>15}")
    for count, row in rows.items():
        print(f"{count:>8}{row['median_seconds']:>10.2f}{row['jaccard_with_32']:>15.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
