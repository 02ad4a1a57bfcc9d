"""Worker of tests/test_dist_fused.py, run by torchrun: the fused CE + KD loss (linear_distill_loss) with its
lm_head under DDP or FSDP2 (fully_shard), over gloo on CPU, with gradient accumulation and num_items; rank 0
compares the loss and the lm_head gradient with one process on the whole batch and writes the result.

    python -m torch.distributed.run --nproc-per-node W _dist_fused.py {ddp,fsdp} ACCUM OUT.json
"""
import contextlib
import json
import sys

import torch
import torch.distributed as dist

import kdkernels

V, H, K, ROWS = 97, 16, 5, 96  # ROWS: the global batch, split over ranks x accumulation steps


def data():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(ROWS, H, generator=g)
    labels = torch.randint(0, V, (ROWS,), generator=g)
    labels[torch.rand(ROWS, generator=g) < 0.2] = -100  # unlabelled rows: num_items counts the others
    values, ids = torch.randn(ROWS, V, generator=g).log_softmax(-1).topk(K, -1)
    return hidden, labels, values, ids


def main(mode, accum, out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    ref_head = torch.nn.Linear(H, V, bias=False)
    ref_head.load_state_dict(head.state_dict())
    # the fused loss as the head's module: FSDP gathers the weight around its forward, DDP reduces its gradient
    model = kdkernels.LinearDistillLoss(head, values_are="logprobs", temperature=2.0, chunk_size=32)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    hidden, labels, values, ids = data()
    num_items = int((labels != -100).sum())  # over the whole global batch, as HF's num_items_in_batch
    chunks = [c.tensor_split(world * accum) for c in (hidden, labels, values, ids)]
    total = torch.zeros(())
    for step in range(accum):
        part = [c[step * world + rank] for c in chunks]
        # each rank's share, scaled by the world size because DDP / FSDP average the gradients over ranks
        skip_sync = mode == "ddp" and step < accum - 1  # DDP: sum the micro-steps locally, reduce once
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            loss = model(*part, num_items=num_items)[0] * world
            loss.backward()
        total += loss.detach() / world
    dist.all_reduce(total)
    w = model.module.lm_head.weight if mode == "ddp" else model.lm_head.weight
    grad = w.grad.full_tensor() if hasattr(w.grad, "full_tensor") else w.grad
    if rank == 0:
        ref = kdkernels.LinearDistillLoss(ref_head, values_are="logprobs", temperature=2.0, chunk_size=32)(
            hidden, labels, values, ids, num_items=num_items)[0]
        ref.backward()
        result = dict(loss=float(total), ref_loss=float(ref), grad_err=float((grad - ref_head.weight.grad).abs().max()),
                      grad_scale=float(ref_head.weight.grad.abs().max()), world=world, mode=mode, accum=accum)
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
