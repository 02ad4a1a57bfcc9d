"""Benchmarks of kdkernels.attention, shared_attention, EchoAtt groups and stacks vs eager, its compile, SDPA, flash-attn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common
import kdkernels
from kdkernels.reference import attention_ref, shared_attention_ref

# The spec's bar shapes (shared/design/ops/shared_attention.md, "Bars") and small ones for a quick look. On the
# GPU, attention and the sharing layer also run at d = 128, the tensor-core bar shape of issue 13.
FULL = {"cpu": [dict(B=2, H=8, Hk=8, T=512, D=64, dtype=torch.float32)],
        "cuda": [dict(B=4, H=32, Hk=32, T=2048, D=64, dtype=torch.bfloat16),
                 dict(B=4, H=32, Hk=32, T=2048, D=128, dtype=torch.bfloat16)]}
QUICK = {"cpu": [dict(B=1, H=4, Hk=4, T=256, D=64, dtype=torch.float32)],
         "cuda": [dict(B=2, H=16, Hk=16, T=1024, D=64, dtype=torch.bfloat16)]}
GROUP_FULL = {dev: shapes[:1] for dev, shapes in FULL.items()}
# TinyLlama-1.1B's decoder (22 layers, hidden 2048, 32 heads, 4 kv heads, MLP 5632) with 9 sharing layers; CPU
# scaled down.
STACK_FULL = {"cpu": [dict(layers=22, hidden=256, heads=8, kv_heads=2, mlp=688, B=1, T=256, shared=9,
                           dtype=torch.float32)],
              "cuda": [dict(layers=22, hidden=2048, heads=32, kv_heads=4, mlp=5632, B=4, T=2048, shared=9,
                            dtype=torch.bfloat16)]}
STACK_QUICK = {"cpu": [dict(layers=8, hidden=128, heads=4, kv_heads=2, mlp=344, B=1, T=128, shared=3,
                            dtype=torch.float32)],
               "cuda": [dict(layers=22, hidden=2048, heads=32, kv_heads=4, mlp=5632, B=1, T=1024, shared=9,
                             dtype=torch.bfloat16)]}
GROUP_LAYERS = 4  # an EchoAtt group: the anchor and 3 sharing layers

SDPA_BACKENDS = {"sdpa flash": "FLASH_ATTENTION", "sdpa efficient": "EFFICIENT_ATTENTION",
                 "sdpa cudnn": "CUDNN_ATTENTION"}
ATTENTION_IMPLS = ["kdkernels", "eager", "eager+compile", "sdpa", *SDPA_BACKENDS, "flash-attn"]
# sharing layer: "kdkernels" is mode="recompute" (what an EchoAtt model runs at these lengths); the peers do a
# full attention call of the same shape, the work a layer that does not share would do.
SHARING_IMPLS = ["kdkernels", "kdkernels materialize", "eager", "eager+compile", "sdpa", "flash-attn"]
# group: "kdkernels" is SharedAttentionGroup (the anchor's dQ, dK formed once); "per-layer" a recompute-mode
# shared_attention per layer; "materialize" one P for the group (shared_attention_probs); "sdpa" 4 SDPA layers.
GROUP_IMPLS = ["kdkernels", "kdkernels per-layer", "kdkernels materialize", "eager", "eager+compile", "sdpa"]
# stack: "eager" is the unshared model as transformers builds it (SDPA attention), the EchoAtt student's baseline.
STACK_IMPLS = ["kdkernels", "eager"]

# Bars (spec): CPU every kdkernels variant within 3x of eager's time; GPU attention >= 0.8x (forward) and >= 0.6x
# (forward+backward) the fastest SDPA backend's throughput (a bar per backend: passing all is passing the fastest);
# a sharing layer >= 1.3x faster than SDPA and flash-attn, an EchoAtt group of 4 >= 1.3x faster than 4 SDPA layers;
# the EchoAtt stack >= 1.15x faster per training step than the unshared one.
CPU_EAGER_BAR, GPU_FWD_BAR, GPU_FWD_BWD_BAR, GPU_SHARED_BAR, GPU_STACK_BAR = 3.0, 0.8, 0.6, 1.3, 1.15


def make_inputs(shape, device, n_values=1, seed=0):
    """q (B, H, T, D), k and `n_values` value tensors (B, Hk, T, D) requiring grad, in the shape's dtype."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(heads):
        s = (shape["B"], heads, shape["T"], shape["D"])
        return torch.randn(*s, generator=g, device=device).to(shape["dtype"]).requires_grad_()

    return r(shape["H"]), r(shape["Hk"]), [r(shape["Hk"]) for _ in range(n_values)]


def upstream(shape, device, *lead, seed=1):
    """A fixed gradient for an output (*lead, B, H, T, D), the same for every implementation."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = (*lead, shape["B"], shape["H"], shape["T"], shape["D"])
    return torch.randn(*s, generator=g, device=device).to(shape["dtype"])


def fwd_bwd(fn, leaves, grad_out, backward=True):
    """The step: fn()'s output backpropagated from `grad_out` (as a layer gets it in training) into fresh .grad of
    `leaves`, or the forward alone under no_grad. Only the first call, the one the report records, returns the
    loss <out, grad_out> that gradient belongs to: on a GPU that product costs a few percent of an attention
    step, enough to blur the bars' speedups."""
    first = [True]

    def step():
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(backward):
            out = fn()
        if backward:
            out.backward(grad_out)
        if first[0]:
            first[0] = False
            return (out.detach().float() * grad_out.float()).sum()
        return None

    return step


def step_leaves_cleared(*leaves):
    """mem_setup: drop the gradients the previous call left, so they do not count in the memory baseline."""
    def clear():
        for t in leaves:
            t.grad = None
    return clear


def _repeat_kv(x, heads):
    """GQA key/value heads repeated to `heads` (what plain SDPA and the eager reference are given)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def peer_attention(impl, device):
    """(q, k, v) -> causal attention output of a peer: plain SDPA, one SDPA backend (GPU), or flash-attn (GPU)."""
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1]),
                                                              is_causal=True)
    if device.type != "cuda":
        pytest.skip(f"{impl} is benchmarked on CUDA only")
    if impl == "flash-attn":
        fa = pytest.importorskip("flash_attn").flash_attn_func  # (B, T, H, D) layout, GQA native
        return lambda q, k, v: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  causal=True).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[impl])

    def run(q, k, v):  # one backend on its own, so the bar is against the fastest of them
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    return run


def reference(impl, fn):
    """The eager reference `fn`, or (eager+compile) it under torch.compile."""
    return torch.compile(fn) if impl == "eager+compile" else fn


def attention_fn(impl, device):
    """(q, k, v) -> causal attention output of `impl`."""
    if impl == "kdkernels":
        return lambda q, k, v: kdkernels.attention(q, k, v, causal=True, return_lse=False)
    if impl.startswith("eager"):
        ref = reference(impl, attention_ref)
        return lambda q, k, v: ref(q, k, v, causal=True)[0]
    return peer_attention(impl, device)


def sharing_fn(impl, device):
    """(q_anchor, k_anchor, lse_anchor, v) -> a sharing layer's output: the anchor's attention applied to v (the
    peers, which cannot share, compute that attention afresh)."""
    if impl.startswith("kdkernels"):
        mode = "materialize" if impl == "kdkernels materialize" else "recompute"
        return lambda q, k, lse, v: kdkernels.shared_attention(q, k, lse, v, causal=True, mode=mode)
    if impl.startswith("eager"):
        ref = reference(impl, shared_attention_ref)
        return lambda q, k, lse, v: ref(q, k, v, causal=True)
    peer = peer_attention(impl, device)
    return lambda q, k, lse, v: peer(q, k, v)


def attention_flops(shape, backward):
    """FlashAttention's convention: 4 B H T^2 D for QK^T and PV, half of it causal; forward+backward 3.5x that."""
    f = 4.0 * shape["B"] * shape["H"] * shape["T"] ** 2 * shape["D"] * 0.5
    return f * (3.5 if backward else 1.0)


def bars(device, case, impl, shape):
    """The spec's bars of a kdkernels row. CPU: every kdkernels variant within 3x of eager. GPU: the stack; the
    attention forward / forward+backward against every SDPA backend at the tensor-core bar shape (D = 128, issue
    13); the sharing layer in recompute mode (what an EchoAtt model runs) and the SharedAttentionGroup at the
    spec's d = 64. Other rows are timed without a bar."""
    if not impl.startswith("kdkernels"):
        return ()
    if case == "stack train step":
        return [dict(vs="eager", min_speedup=GPU_STACK_BAR)] if device.type == "cuda" else []
    if device.type == "cpu":
        return [dict(vs="eager", min_speedup=1 / CPU_EAGER_BAR)]
    if case.startswith("attention"):
        want = GPU_FWD_BAR if case == "attention fwd causal" else GPU_FWD_BWD_BAR
        return [dict(vs=b, min_speedup=want) for b in SDPA_BACKENDS] if shape["D"] == 128 else []
    if impl != "kdkernels" or shape["D"] != 64:
        return []
    if case.startswith("sharing"):
        return [dict(vs="sdpa", min_speedup=GPU_SHARED_BAR), dict(vs="flash-attn", min_speedup=GPU_SHARED_BAR)]
    return [dict(vs="sdpa", min_speedup=GPU_SHARED_BAR)]


@pytest.mark.shapes(full=FULL, quick=QUICK)
@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention(kdk_bench, device, shape, backward, impl):
    fn = attention_fn(impl, device)
    q, k, (v,) = make_inputs(shape, device)
    leaves = (q, k, v)
    step = fwd_bwd(lambda: fn(q, k, v), leaves, upstream(shape, device), backward)
    case = f"attention {'fwd+bwd' if backward else 'fwd'} causal"
    # The GEMM floor (GPU) on every row: its floor fraction is the share of the measured matmul rate reached.
    kdk_bench.run(step, op="shared_attention", case=case, impl=impl, device=device, shape=shape,
                  floor_ms=common.floor_ms(device, flops=attention_flops(shape, backward)),
                  bars=bars(device, case, impl, shape), mem_setup=step_leaves_cleared(*leaves), grads=leaves)


@pytest.mark.shapes(full=FULL, quick=QUICK)
@pytest.mark.parametrize("impl", SHARING_IMPLS)
def test_sharing_layer(kdk_bench, device, shape, impl):
    fn = sharing_fn(impl, device)
    q, k, (v, v_l) = make_inputs(shape, device, n_values=2)
    with torch.no_grad():  # the anchor's statistic, computed by its own layer
        _, lse = kdkernels.attention(q, k, v, causal=True)
    leaves = (q, k, v_l)
    step = fwd_bwd(lambda: fn(q, k, lse, v_l), leaves, upstream(shape, device))
    case = "sharing layer fwd+bwd causal"
    kdk_bench.run(step, op="shared_attention", case=case, impl=impl, device=device, shape=shape,
                  bars=bars(device, case, impl, shape), mem_setup=step_leaves_cleared(*leaves), grads=leaves)


def group_eager(q, k, vs):
    """The group without sharing anything: each layer's attention from scratch, materialised."""
    return torch.stack([attention_ref(q, k, v, causal=True)[0] for v in vs])


def group_fn(impl, device):
    """(q, k, vs) -> the stacked outputs of an EchoAtt group: the anchor's attention on vs[0], the sharing layers'
    on the rest (or, for the peers, a full attention per layer)."""
    if impl.startswith("eager"):
        return reference(impl, group_eager)
    if impl == "sdpa":
        peer = peer_attention(impl, device)
        return lambda q, k, vs: torch.stack([peer(q, k, v) for v in vs])

    def run(q, k, vs):
        out0, lse = kdkernels.attention(q, k, vs[0], causal=True)
        if impl == "kdkernels":
            group = kdkernels.SharedAttentionGroup(q, k, lse, causal=True)
            outs = [group(v) for v in vs[1:]]
        elif impl == "kdkernels materialize":
            P = kdkernels.shared_attention_probs(q, k, lse, causal=True)
            outs = [kdkernels.shared_attention(q, k, lse, v, causal=True, probs=P) for v in vs[1:]]
        else:
            outs = [kdkernels.shared_attention(q, k, lse, v, causal=True, mode="recompute") for v in vs[1:]]
        return torch.stack([out0, *outs])

    return run


@pytest.mark.shapes(full=GROUP_FULL, quick=QUICK)
@pytest.mark.parametrize("impl", GROUP_IMPLS)
def test_group(kdk_bench, device, shape, impl):
    fn = group_fn(impl, device)
    q, k, vs = make_inputs(shape, device, n_values=GROUP_LAYERS)
    leaves = (q, k, *vs)
    step = fwd_bwd(lambda: fn(q, k, vs), leaves, upstream(shape, device, GROUP_LAYERS))
    case = f"group of {GROUP_LAYERS} fwd+bwd causal"
    kdk_bench.run(step, op="shared_attention", case=case, impl=impl, device=device, shape=shape,
                  bars=bars(device, case, impl, shape), mem_setup=step_leaves_cleared(*leaves), grads=leaves)


def stack_groups(layers, shared):
    """`shared` sharing layers as (anchor, sharer) pairs from layer 1 on, each other layer on its own; the first
    layer and the last keep their own attention."""
    groups, i, left = [[0]], 1, shared
    while i < layers:
        if left > 0 and i + 1 < layers - 1:
            groups.append([i, i + 1])
            i, left = i + 2, left - 1
        else:
            groups.append([i])
            i += 1
    return groups


def llama(cfg, device):
    """A randomly initialised transformers LlamaModel of the stack's shape with SDPA attention, built on `device`."""
    transformers = pytest.importorskip("transformers", reason="the stack needs transformers (kdkernels[hf])")
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=1024, hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
                                 num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                 num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(cfg["T"], 128))
    c._attn_implementation = "sdpa"
    with device:  # initialised in place: a 1.1B-parameter model takes a while on the host
        return transformers.LlamaModel(c).to(cfg["dtype"])


@pytest.mark.shapes(full=STACK_FULL, quick=STACK_QUICK)
@pytest.mark.parametrize("impl", STACK_IMPLS)
def test_stack(kdk_bench, device, shape, impl):
    from kdkernels.echoatt import convert_to_echoatt

    model = llama(shape, device)
    if impl == "kdkernels":
        model = convert_to_echoatt(model, stack_groups(shape["layers"], shape["shared"]), inplace=True)
    model.train()
    ids = torch.randint(0, 1024, (shape["B"], shape["T"]), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    # A fixed random projection of the last hidden state: after the final RMSNorm its mean square is ~1 for any
    # model, so that would be a loss without information (and near-zero gradients).
    proj = torch.randn(shape["hidden"], generator=torch.Generator().manual_seed(1)).to(device)

    def step():  # one training step of the decoder stack (no LM head): forward, a loss, backward
        model.zero_grad(set_to_none=True)
        loss = (model(input_ids=ids).last_hidden_state.float() @ proj).pow(2).mean()
        loss.backward()
        return loss

    case = "stack train step"
    # Its loss diff vs eager compares two models (sharing layers drop W_q, W_k), not the rounding of one; their
    # gradients are not compared for the same reason.
    kdk_bench.run(step, op="shared_attention", case=case, impl=impl, device=device, shape=shape,
                  bars=bars(device, case, impl, shape), mem_setup=lambda: model.zero_grad(set_to_none=True),
                  params=sum(p.numel() for p in model.parameters()))
