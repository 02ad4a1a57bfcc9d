"""Which layers may share attention: per-layer (Q, K) of a model, the streamed L x L attention similarity,
groups of contiguous similar layers, and a heatmap.

    qs, ks, mask, causal = collect_qk(teacher, input_ids, attention_mask)
    S = attention_similarity(qs, ks, metric="js", causal=causal, mask=mask)
    groups = plan_groups(S, threshold=0.8)          # or n_shared=9
    plot_similarity(S, "similarity.png", groups=groups)
    student = convert_to_echoatt(teacher, groups)
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from ..functional import attention_similarity
from .modeling import EchoAttention, apply_rope, find_decoder_layers, hf_attention_mask

_PRE = "kdkernels.echoatt: "


def collect_qk(model: torch.nn.Module, input_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None, **forward_kwargs):
    """Run a Hugging Face Llama-family model once (no gradient, no cache) and return (qs, ks, mask, causal):
    every decoder layer's query and key tensors (B, H, T, d) and (B, Hk, T, d) exactly as its attention sees
    them (after the projections, Q/K norms where present and RoPE), and the mask/causal flag of that attention
    (see hf_attention_mask), ready for attention_similarity."""
    _, layers = find_decoder_layers(model)
    L = len(layers)
    qs: List[Optional[torch.Tensor]] = [None] * L
    ks: List[Optional[torch.Tensor]] = [None] * L
    masks: List[Optional[torch.Tensor]] = [None] * L
    handles = []

    def project(attn, proj, norm, h, head_dim):
        B, T, _ = h.shape
        y = proj(h).view(B, T, -1, head_dim)
        if isinstance(norm, torch.nn.Module):
            y = norm(y)
        return y.transpose(1, 2)

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, EchoAttention):
            raise ValueError(f"{_PRE}collect_qk analyses the original (teacher) model: layer {i} is already an "
                             "EchoAttention")

        def hook(mod, args, kwargs, i=i):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            head_dim = int(getattr(mod, "head_dim", mod.q_proj.out_features // model.config.num_attention_heads))
            q = project(mod, mod.q_proj, getattr(mod, "q_norm", None), h, head_dim)
            k = project(mod, mod.k_proj, getattr(mod, "k_norm", None), h, head_dim)
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is not None:
                q, k = apply_rope(q, k, *pe)
            qs[i], ks[i] = q.detach(), k.detach()
            masks[i] = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(L) if qs[i] is None]
    if missing:
        raise RuntimeError(f"{_PRE}the attention of layers {missing} did not run")
    mask, causal = hf_attention_mask(masks[0])
    return qs, ks, mask, causal


def layer_similarity(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     *, metric: str = "js", **forward_kwargs) -> torch.Tensor:
    """The (L, L) attention similarity of a Hugging Face Llama-family model's decoder layers on `input_ids`
    (collect_qk + attention_similarity with the model's own scale, mask and causality)."""
    qs, ks, mask, causal = collect_qk(model, input_ids, attention_mask, **forward_kwargs)
    _, layers = find_decoder_layers(model)
    scale = getattr(layers[0].self_attn, "scaling", None)
    return attention_similarity(qs, ks, metric=metric, causal=causal, scale=scale, mask=mask)


def plan_groups(similarity, *, threshold: Optional[float] = None, n_shared: Optional[int] = None,
                keep_first: int = 1, keep_last: int = 1) -> List[List[int]]:
    """Groups of contiguous layers for convert_to_echoatt, from an (L, L) similarity matrix.

    The first `keep_first` and last `keep_last` layers keep their own attention (EchoAtt shares inner layers).
    threshold: scanning the inner layers in order, a group's anchor is its first layer and each following
    layer joins while its similarity to the anchor is >= threshold. n_shared: exactly that many sharing
    layers: the highest threshold giving at least n_shared, then the group tails least similar to their
    anchors are split off. Returns [[0], [1, 2, 3], [4], ...] covering every layer once, anchors first.
    """
    S = similarity.detach().double().cpu().numpy() if isinstance(similarity, torch.Tensor) else \
        np.asarray(similarity, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] == 0:
        raise ValueError(f"{_PRE}similarity must be a square (L, L) matrix: got shape {S.shape}")
    if (threshold is None) == (n_shared is None):
        raise ValueError(f"{_PRE}plan_groups takes exactly one of threshold or n_shared")
    L = S.shape[0]
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"{_PRE}keep_first and keep_last must be >= 0: got {keep_first} and {keep_last}")
    start, end = min(keep_first, L), max(min(keep_first, L), L - keep_last)

    def greedy(t: float) -> List[List[int]]:
        groups, i = [], start
        while i < end:
            j = i + 1
            while j < end and S[i, j] >= t:
                j += 1
            groups.append(list(range(i, j)))
            i = j
        return groups

    if threshold is not None:
        inner = greedy(float(threshold))
    else:
        n_shared = int(n_shared)
        most = max(end - start - 1, 0)
        if not 0 <= n_shared <= most:
            raise ValueError(f"{_PRE}n_shared must be in [0, {most}] for {L} layers with keep_first={keep_first}, "
                             f"keep_last={keep_last}: got {n_shared}")
        cands = sorted({float(S[a, b]) for a in range(start, end) for b in range(a + 1, end)}, reverse=True)
        inner = greedy(float("inf"))
        for t in cands + [-float("inf")]:
            inner = greedy(t)
            if sum(len(g) - 1 for g in inner) >= n_shared:
                break
        while sum(len(g) - 1 for g in inner) > n_shared:  # split off the least similar tail
            gi = min((k for k, g in enumerate(inner) if len(g) > 1), key=lambda k: S[inner[k][0], inner[k][-1]])
            tail = inner[gi].pop()
            inner.insert(gi + 1, [tail])
    return [[i] for i in range(start)] + inner + [[i] for i in range(end, L)]


def format_similarity(similarity, digits: int = 2) -> str:
    """The matrix as an aligned text table with layer indices."""
    S = similarity.detach().double().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    L = S.shape[0]
    w = max(digits + 3, len(str(L - 1)) + 1)
    head = " " * (len(str(L - 1)) + 1) + "".join(f"{j:>{w}}" for j in range(L))
    rows = [f"{i:>{len(str(L - 1))}} " + "".join(f"{S[i, j]:>{w}.{digits}f}" for j in range(L)) for i in range(L)]
    return "\n".join([head] + rows)


def plot_similarity(similarity, path: str, *, title: Optional[str] = None,
                    groups: Optional[Sequence[Sequence[int]]] = None, vmin: Optional[float] = None,
                    vmax: Optional[float] = None) -> str:
    """Write the (L, L) similarity as a PNG heatmap (matplotlib: pip install 'kdkernels[plot]'); groups
    (plan_groups' result) are outlined. Returns path."""
    from .._plot import plot_heatmap

    S = similarity.detach().double().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    boxes = [(g[0], g[0], g[-1], g[-1]) for g in (groups or ()) if len(g) > 1]
    plot_heatmap(S, path, title if title is not None else "attention similarity", x_label="layer", y_label="layer",
                 vmin=vmin, vmax=vmax, boxes=boxes)
    return path
