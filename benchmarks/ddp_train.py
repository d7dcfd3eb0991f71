"""Data-parallel training of a peft_ext adapter: DDP or FSDP2 over torch.distributed (gloo on CPU, nccl on GPUs).

    torchrun --nproc_per_node=2 benchmarks/ddp_train.py --family mlora --out runs/ddp
    torchrun --nproc_per_node=2 benchmarks/ddp_train.py --family mlora --fsdp --out runs/fsdp

Every rank builds the same tiny model (``configs/tiny-llama.json``) and adapter and takes its own shard of a toy task
(sums). Sparse gates are selected and PiSSA directions calibrated on the shards (the statistics are all-reduced), then
the adapter trains ``--steps`` steps. With DDP, after every step the trainable parameters are gathered from all ranks
and compared (gradients are all-reduced, so they must be identical). Rank 0 saves the adapter (with FSDP2 from the
gathered full state dict); every rank reloads it onto a fresh base and compares logits with the trained model. Each rank
writes ``OUT/rank<r>.json``: digests of what it selected, the largest cross-rank parameter difference, the loss
curve, the reload check and the training steps per second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch.nn.parallel import DistributedDataParallel

from peft_ext import GateConfig, ModulatedLoraConfig, ModulatedPissaConfig, calibrate, select_gates
from peft_ext.data import Example, cycle, make_batches
from peft_ext.tiny import build_model, char_tokenizer

CONFIGS = {
    "gate": lambda: GateConfig(num_gates=48, max_log_gate=0.5),
    "mlora": lambda: ModulatedLoraConfig(r=4),
    "mpissa": lambda: ModulatedPissaConfig(r=4, selection="wanda"),
}


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def selected_digest(model) -> str:
    """What selection/calibration chose (gate masks, PiSSA bases) and LoRA's random A: must agree across ranks."""
    return digest(tensor for name, tensor in sorted(model.state_dict().items())
                  if any(key in name for key in ("loggate_mask", "mpissa_vt", "mlora_A")))


def max_rank_difference(params) -> float:
    """Largest |p_rank - p_rank0| over the trainable parameters (0.0 when the ranks agree exactly)."""
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def adapted(family: str, shard: list[dict], device: torch.device):
    """The tiny model with a fresh adapter, its gates selected or PiSSA directions calibrated on ``shard``."""
    model = get_peft_model(build_model("tiny-llama", seed=0), CONFIGS[family]()).to(device)
    if family == "gate":
        select_gates(model, shard, progress=False)
    elif family == "mpissa":
        calibrate(model, shard, progress=False)
    return model


@contextmanager
def local_statistics():
    """Selection and calibration from this rank's shard only (what peft_ext would do without its all-reduce)."""
    import peft_ext.pissa
    import peft_ext.selection

    saved = peft_ext.selection.all_reduce_sum, peft_ext.pissa.all_reduce_sum
    peft_ext.selection.all_reduce_sum = peft_ext.pissa.all_reduce_sum = lambda tensor: tensor
    try:
        yield
    finally:
        peft_ext.selection.all_reduce_sum, peft_ext.pissa.all_reduce_sum = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per block instead of DDP")
    parser.add_argument("--check-reduction", action="store_true",
                        help="also record what each rank would select from its own shard alone (no all-reduce)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = char_tokenizer()
    examples = [Example(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    shard = make_batches(tokenizer, examples[rank::world], args.batch_size, seed=rank)  # each rank: its own data
    report = {"rank": rank, "world_size": world, "family": args.family, "mode": "fsdp2" if args.fsdp else "ddp"}
    if args.check_reduction:
        with local_statistics():
            report["local_digest"] = selected_digest(adapted(args.family, shard, device))
    model = adapted(args.family, shard, device)
    report["selected_digest"] = selected_digest(model)

    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        trained = fully_shard(model)
    else:
        trained = DistributedDataParallel(model)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses, differences = [], []
    batches = cycle(shard)
    trained.train()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = {key: value.to(device) for key, value in next(batches).items()}
        loss = trained(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not args.fsdp:
            differences.append(max_rank_difference(params))
    dist.barrier()
    report.update(train_seconds=time.perf_counter() - start, losses=losses, max_rank_difference=max(differences or [0]))
    report["steps_per_second"] = args.steps / report["train_seconds"]

    model.eval()
    probe = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = model(input_ids=probe).logits.cpu()
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if args.fsdp:
            model.save_pretrained(out / "adapter", state_dict=state)
        else:
            model.save_pretrained(out / "adapter")
    dist.barrier()
    reloaded = PeftModel.from_pretrained(build_model("tiny-llama", seed=0), out / "adapter").to(device).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.cpu()
    report["reload_equal"] = bool(torch.equal(logits, expected))
    report["reload_max_difference"] = float((logits - expected).abs().max())
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
