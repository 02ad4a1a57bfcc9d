"""Worker functions of the multi-process tests (gloo on CPU): each rank checks itself and raises on mismatch."""
import contextlib
import os

import torch
import torch.distributed as dist

import kdkernels
from kdkernels import _ops

SPARSE_CASES = [("renorm", "forward_kl", "logits"), ("tail", "jsd", "logprobs"), ("support", "reverse_kl", "logits"),
                ("tail", "tvd", "logprobs")]
DENSE_CASES = [("dense", "forward_kl", "logits"), ("dense", "skew_reverse_kl", "logprobs")]


def _init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _slices(V, world):
    """Uneven slices laid end to end (the last rank takes the remainder)."""
    base = V // world
    sizes = [base + (1 if r < V % world else 0) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return starts, sizes


def vocab_parallel(rank, world, port, emulated=False):
    """emulated: both the single-process op and the ranks' ops run the CUDA code path on the emulator."""
    _init(rank, world, port)
    try:
        with (_ops.emulated() if emulated else contextlib.nullcontext()):
            _vocab_parallel(rank, world)
    finally:
        dist.destroy_process_group()


def _vocab_parallel(rank, world):
    g = torch.Generator().manual_seed(1234)  # the same full problem on every rank
    N, V, K = 13, 57, 6
    starts, sizes = _slices(V, world)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    z = torch.randn(N, V, dtype=torch.float64, generator=g) * 2
    teacher = torch.randn(N, V, dtype=torch.float64, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    up = torch.randn(N, dtype=torch.float64, generator=g)
    for mode, div, values_are in SPARSE_CASES + DENSE_CASES:
        for reduction in ("mean", "none"):
            kw = dict(mode=mode, divergence=div, values_are=values_are, temperature=1.3, labels=labels,
                      reduction=reduction)
            if reduction == "none":  # and the student's final-logit map (Cohere's scale, Gemma's softcap)
                kw.update(logit_scale=0.8, softcap=3.0)
            if mode == "dense":
                vals = teacher if values_are == "logits" else torch.log_softmax(teacher, -1)
                ids, local_vals = None, vals[:, lo:hi]
            else:
                vals, ids = kdkernels.teacher_topk(teacher, K, temperature=1.3, values_are=values_are)
                ids[0, -1] = V + 3  # a teacher id beyond the student vocabulary: dropped
                kw["out_of_range"] = "drop"
                local_vals = vals
            full = z.clone().requires_grad_()
            ref = kdkernels.topk_kl_div(full, vals, ids, **kw)
            local = z[:, lo:hi].clone().requires_grad_()
            got = kdkernels.vocab_parallel_topk_kl_div(local, local_vals, ids, **kw)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=f"{mode} {div} {reduction} value")
            u = up if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
            g_ref, = torch.autograd.grad(ref, full, u)
            g_got, = torch.autograd.grad(got, local, u)
            torch.testing.assert_close(g_got, g_ref[:, lo:hi], rtol=1e-9, atol=1e-12,
                                       msg=f"{mode} {div} {reduction} grad slice")

    # Fused linear, vocab-parallel: lm_head rows split over the ranks.
    H = 9
    h = torch.randn(N, H, dtype=torch.float64, generator=g)
    W = torch.randn(V, H, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g)
    vals, ids = kdkernels.teacher_topk(teacher, K, values_are="logprobs")
    for reduction in ("mean", "none"):
        kw = dict(mode="tail", values_are="logprobs", labels=labels, reduction=reduction, temperature=2.0)
        hf, Wf, bf = (t.clone().requires_grad_() for t in (h, W, b))
        ref = kdkernels.topk_kl_div(hf @ Wf.t() + bf, vals, ids, **kw)
        hl, Wl, bl = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        got = kdkernels.vocab_parallel_linear_topk_kl_div(hl, Wl, vals, ids, local_bias=bl, chunk_size=4, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=f"linear {reduction} value")
        u = up if reduction == "none" else torch.tensor(0.8, dtype=torch.float64)
        gr = torch.autograd.grad(ref, (hf, Wf, bf), u)
        gg = torch.autograd.grad(got, (hl, Wl, bl), u)
        torch.testing.assert_close(gg[0], gr[0], rtol=1e-9, atol=1e-12, msg="linear grad hidden")
        torch.testing.assert_close(gg[1], gr[1][lo:hi], rtol=1e-9, atol=1e-12, msg="linear grad weight slice")
        torch.testing.assert_close(gg[2], gr[2][lo:hi], rtol=1e-9, atol=1e-12, msg="linear grad bias slice")


def data_parallel(rank, world, port):
    """DDP recipe: num_items = global valid-token count / world size gives the single-process gradient."""
    _init(rank, world, port)
    try:
        g = torch.Generator().manual_seed(99)
        N, H, V, K = 24, 7, 31, 5
        x = torch.randn(N, H, dtype=torch.float64, generator=g)
        teacher = torch.randn(N, V, dtype=torch.float64, generator=g)
        labels = torch.randint(0, V, (N,), generator=g)
        labels[1::4] = -100
        vals, ids = kdkernels.teacher_topk(teacher, K, values_are="logprobs")
        torch.manual_seed(5)  # the same initial model on every rank (DDP would broadcast rank 0's anyway)
        model = torch.nn.Linear(H, V, dtype=torch.float64)
        ref_model = torch.nn.Linear(H, V, dtype=torch.float64)
        ref_model.load_state_dict(model.state_dict())
        kw = dict(values_are="logprobs", mode="tail", labels=None)

        ref = kdkernels.topk_kl_div(ref_model(x), vals, ids, values_are="logprobs", mode="tail", labels=labels)
        ref.backward()

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        rows = torch.arange(rank, N, world)  # this rank's share of the batch
        count = (labels != -100).sum().double()  # the global count (known to every rank, or all-reduced)
        kw["labels"] = labels[rows]
        loss = kdkernels.topk_kl_div(ddp(x[rows]), vals[rows], ids[rows], reduction="sum",
                                     num_items=count / world, **kw)
        loss.backward()
        torch.testing.assert_close(model.weight.grad, ref_model.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.bias.grad, ref_model.bias.grad, rtol=1e-10, atol=1e-12)
        total = loss.detach().clone() / world
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref.detach(), rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


def vocab_parallel_autocast(rank, world, port, amp_dtype):
    """Both vocab-parallel entry points under CPU autocast with float32 parameters match one process."""
    _init(rank, world, port)
    try:
        g = torch.Generator().manual_seed(77)
        N, H, V, K = 11, 16, 45, 5
        starts, sizes = _slices(V, world)
        lo, hi = starts[rank], starts[rank] + sizes[rank]
        h = torch.randn(N, H, generator=g)
        W = torch.randn(V, H, generator=g) / H ** 0.5 * 3
        vals, ids = kdkernels.teacher_topk(torch.randn(N, V, generator=g) * 2, K, values_are="logprobs")
        kw = dict(mode="tail", divergence="jsd", values_are="logprobs")
        with torch.autocast("cpu", dtype=amp_dtype):
            Wf = W.clone().requires_grad_()
            z = h @ Wf.t()  # 16-bit logits, as a model's lm_head gives them inside the region
            ref = kdkernels.topk_kl_div(z, vals, ids, **kw)
            Wl = W[lo:hi].clone().requires_grad_()
            zl = h @ Wl.t()
            got = kdkernels.vocab_parallel_topk_kl_div(zl, vals, ids, **kw)
        assert zl.dtype == amp_dtype and got.dtype == torch.float32, (zl.dtype, got.dtype)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        gr, = torch.autograd.grad(ref, Wf)
        gg, = torch.autograd.grad(got, Wl)
        torch.testing.assert_close(gg, gr[lo:hi], rtol=2e-2, atol=2e-2 * float(gr.abs().max()))

        # fused linear: float32 head, a float32 and a 16-bit hidden state (made inside the region)
        for make16 in (False, True):
            hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
            hl, Wl = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_()
            with torch.autocast("cpu", dtype=amp_dtype):
                a = hf.to(amp_dtype) if make16 else hf
                b = hl.to(amp_dtype) if make16 else hl
                ref = kdkernels.linear_topk_kl_div(a, Wf, vals, ids, chunk_size=4, **kw)
                got = kdkernels.vocab_parallel_linear_topk_kl_div(b, Wl, vals, ids, chunk_size=4, **kw)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            gr = torch.autograd.grad(ref, (hf, Wf))
            gg = torch.autograd.grad(got, (hl, Wl))
            assert gg[0].dtype == gg[1].dtype == torch.float32
            torch.testing.assert_close(gg[0], gr[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gg[1], gr[1][lo:hi], rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
