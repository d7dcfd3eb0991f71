"""Data-parallel scaling: training steps per second with 1 and 2 processes for each family (DDP, and FSDP2 for
modulated LoRA), from ``benchmarks/ddp_train.py`` launched with torchrun.

Each process trains on its own batches of 8 examples, so 2 processes see twice the examples per step; the table gives
steps/s and examples/s. torchrun gives each process one CPU thread (OMP_NUM_THREADS=1), so on a 2-core CPU machine
1 process uses 1 core and 2 processes use 2. On GPUs (``--nproc 2`` with 2 GPUs) each rank takes one device.

    python benchmarks/ddp_scaling.py            # CPU, about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import environment, result_path

from peft_ext.io import write_json

HERE = Path(__file__).resolve().parent
RUNS = [("gate", ()), ("mlora", ()), ("mpissa", ()), ("mlora", ("--fsdp",))]
BATCH = 8


def run(family: str, extra: tuple, processes: int, steps: int, port: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={processes}",
                   f"--master_port={port}", str(HERE / "ddp_train.py"), "--family", family, "--steps", str(steps),
                   "--batch-size", str(BATCH), "--out", out, *extra]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        reports = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(processes)]
    steps_per_second = min(report["steps_per_second"] for report in reports)  # the slowest rank sets the pace
    return {"steps_per_second": steps_per_second, "examples_per_second": steps_per_second * BATCH * processes,
            "reload_equal": all(report["reload_equal"] for report in reports)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=result_path("ddp_scaling"))
    args = parser.parse_args()
    rows = []
    for index, (family, extra) in enumerate(RUNS):
        row = {"family": family, "mode": "fsdp2" if extra else "ddp"}
        for processes in (1, 2):
            row[f"{processes}_process"] = run(family, extra, processes, args.steps, 29700 + 2 * index + processes)
        row["examples_speedup"] = row["2_process"]["examples_per_second"] / row["1_process"]["examples_per_second"]
        rows.append(row)
    write_json(args.out, {**environment("cpu"), "dtype": "float32", "seed": 0, "threads_per_process": 1,
                          "steps": args.steps,
                          "batch_per_process": BATCH, "rows": rows})
    print(f"{'family':<8}{'mode':<7}{'1 proc steps/s':>16}{'2 proc steps/s':>16}{'examples/s speed-up':>21}")
    for row in rows:
        print(f"{row['family']:<8}{row['mode']:<7}{row['1_process']['steps_per_second']:>16.1f}"
              f"{row['2_process']['steps_per_second']:>16.1f}{row['examples_speedup']:>21.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
