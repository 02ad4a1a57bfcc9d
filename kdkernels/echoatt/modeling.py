"""EchoAtt students: an attention block whose sharing layers re-use their anchor's softmax, and the conversion
of a Hugging Face Llama-family model (LlamaForCausalLM and kin) into one.

Within a group [a, a+1, ..., a+m] (contiguous layers), layer a is the anchor: it computes Q, K (with RoPE), runs
`kdkernels.attention` and hands (Q, K, LSE) to the group's `EchoGroup`. Each sharing layer computes only V and
its output projection and applies the anchor's attention to its own V with `kdkernels.shared_attention`
(its W_q / W_k are gone). The decoder stack must run in order within one forward pass; a sharing layer whose
anchor has not run in this pass is refused.

`transformers` is optional: nothing here imports it; the modules are found by their attributes.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..functional import (SHARED_ATTENTION_MATERIALIZE_BUDGET, SharedAttentionGroup, attention, shared_attention,
                          shared_attention_probs)

_PRE = "kdkernels.echoatt: "
MODES = ("auto", "recompute", "materialize")


class EchoGroup:
    """What an anchor hands its sharing layers within one forward pass: (Q, K, LSE), the mask it ran with, and
    (mode 'materialize') the probabilities, computed once by the first sharing layer and re-used by the others,
    or (mode 'recompute') a kdkernels.SharedAttentionGroup, whose backward forms the anchor's dQ, dK once.

    Not a Module: it holds activations, never parameters. `clear()` drops them (done at the start of every pass
    of a converted model, and after the group's last sharing layer).
    """

    def __init__(self, anchor: int, sharers: Sequence[int] = ()):
        self.anchor = int(anchor)
        self.sharers = [int(s) for s in sharers]
        self.clear()

    def clear(self):
        self.q = self.k = self.k_new = self.lse = self.mask = self.probs = self.shared = None
        self.causal = True
        self.ran = False

    def __repr__(self):
        return f"EchoGroup(anchor={self.anchor}, sharers={self.sharers}, holds={'Q,K,LSE' if self.ran else 'nothing'})"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Llama's rotary embedding: q, k (B, H, T, d); cos, sin (B, T, d) as the model's rotary module gives them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_attention_mask(attention_mask: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], bool]:
    """The mask a Hugging Face decoder layer passes to its attention -> (bool mask, True = attend, causal).

    None -> (None, causal=True) (sdpa's is_causal path; with a KV cache the causal mask is bottom-right aligned,
    as kdkernels.attention does); a 4-D bool mask (sdpa) is used as is; a 4-D float additive mask (eager) is
    read as attend where it is above half the dtype's minimum (other additive biases are not supported);
    a 2-D (B, Tk) 0/1 padding mask (flash-attention implementations) becomes a key mask with causal=True.
    """
    if attention_mask is None:
        return None, True
    m = attention_mask
    if m.dim() == 2:
        return m.to(torch.bool)[:, None, None, :], True
    if m.dim() != 4:
        raise ValueError(f"{_PRE}the attention mask must be 2-D (B, Tk) or 4-D (B, 1, Tq, Tk): got shape "
                         f"{tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m, False
    return m > torch.finfo(m.dtype).min / 2, False


class EchoAttention(nn.Module):
    """A drop-in attention block (Hugging Face Llama attention interface) with an anchor or sharing role.

    role 'anchor': q_proj, k_proj, v_proj, o_proj; RoPE from `position_embeddings` (cos, sin); runs
    kdkernels.attention and, when its group has sharing layers, stores (Q, K, LSE) in `group`.
    role 'shared': v_proj, o_proj only; applies the anchor's attention (from `group`) to its V.
    mode: how a sharing layer holds P ('auto' | 'recompute' | 'materialize', see kdkernels.shared_attention);
    under 'materialize' (or 'auto' within memory_budget) the group's first sharing layer materialises P once
    and every sharing layer of the group does one batched GEMM with it.
    forward(hidden_states (B, T, hidden), position_embeddings=(cos, sin), attention_mask=None, cache=None, ...)
    -> (output (B, T, hidden), None). Attention dropout is not supported (it must be 0).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, role: str = "anchor", group: Optional[EchoGroup] = None,
                 layer_idx: int = 0, bias: bool = False, o_bias: Optional[bool] = None,
                 scaling: Optional[float] = None, mode: str = "auto", memory_budget: Optional[int] = None):
        super().__init__()
        if role not in ("anchor", "shared"):
            raise ValueError(f"{_PRE}role must be 'anchor' or 'shared': got '{role}'")
        if mode not in MODES:
            raise ValueError(f"{_PRE}mode must be one of 'auto', 'recompute', 'materialize': got '{mode}'")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"{_PRE}num_heads must be a multiple of num_kv_heads: got {num_heads} and {num_kv_heads}")
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.role, self.layer_idx, self.mode = role, int(layer_idx), mode
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = head_dim ** -0.5 if scaling is None else float(scaling)
        self.memory_budget = memory_budget
        self.is_causal = True
        self.group = group if group is not None else EchoGroup(self.layer_idx)
        if role == "anchor":
            self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
            self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if o_bias is None else o_bias)
        self.q_norm = self.k_norm = None  # per-head RMSNorm of Q / K (Qwen3-style), set by from_hf when present

    @classmethod
    def from_hf(cls, attn: nn.Module, config, *, role: str, group: EchoGroup, mode: str = "auto",
                memory_budget: Optional[int] = None) -> "EchoAttention":
        """Wrap a Hugging Face Llama-family attention module, taking over its projections (not copies: convert
        a copy of the model, as convert_to_echoatt does); a sharing layer drops q_proj / k_proj (and q_norm /
        k_norm where present)."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise ValueError(f"{_PRE}{type(attn).__name__} has no nn.Linear '{name}': only Llama-family attention "
                                 "(q_proj, k_proj, v_proj, o_proj) can be converted")
        head_dim = int(getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads))
        num_heads = attn.q_proj.out_features // head_dim
        num_kv = attn.k_proj.out_features // head_dim
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.role, new.layer_idx, new.mode = role, int(getattr(attn, "layer_idx", group.anchor)), mode
        new.num_heads, new.num_kv_heads, new.head_dim = num_heads, num_kv, head_dim
        new.num_key_value_groups = num_heads // num_kv
        new.scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        new.memory_budget = memory_budget
        new.is_causal = True
        new.group = group
        if mode not in MODES:
            raise ValueError(f"{_PRE}mode must be one of 'auto', 'recompute', 'materialize': got '{mode}'")
        new.q_norm = new.k_norm = None
        if role == "anchor":
            new.q_proj, new.k_proj = attn.q_proj, attn.k_proj
            if isinstance(getattr(attn, "q_norm", None), nn.Module):
                new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
        new.v_proj, new.o_proj = attn.v_proj, attn.o_proj
        if hasattr(attn, "config"):
            new.config = attn.config
        return new

    def extra_repr(self) -> str:
        extra = f", shares the attention of layer {self.group.anchor}" if self.role == "shared" else \
            (f", shared by layers {self.group.sharers}" if self.group.sharers else "")
        return (f"role={self.role}, layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, mode={self.mode}{extra}")

    def _materialize(self, g: EchoGroup) -> bool:
        """Whether this group's probabilities are materialised: mode 'materialize', or 'auto' with P (B, H, Tq, Tk)
        in q's dtype within the memory budget."""
        if self.mode != "auto":
            return self.mode == "materialize"
        B, H, Tq, _ = g.q.shape
        budget = SHARED_ATTENTION_MATERIALIZE_BUDGET if self.memory_budget is None else self.memory_budget
        return B * H * Tq * g.k.shape[2] * g.q.element_size() <= budget

    def _project(self, proj: nn.Linear, norm, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        y = proj(x).view(B, T, -1, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, past_key_value=None, **kwargs):
        B, T, _ = hidden_states.shape
        cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
        mask, causal = hf_attention_mask(attention_mask)
        v = self._project(self.v_proj, None, hidden_states)
        g = self.group
        if self.role == "anchor":
            q = self._project(self.q_proj, self.q_norm, hidden_states)
            k = self._project(self.k_proj, self.k_norm, hidden_states)
            cache_kwargs = {}
            if position_embeddings is not None:
                cos, sin = position_embeddings
                q, k = apply_rope(q, k, cos, sin)
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            k_new = k
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, cache_kwargs)
            if g.sharers:
                out, lse = attention(q, k, v, causal=causal, scale=self.scaling, mask=mask)
                g.clear()
                g.q, g.k, g.k_new, g.lse, g.mask, g.causal, g.ran = q, k, k_new, lse, mask, causal, True
            else:
                out = attention(q, k, v, causal=causal, scale=self.scaling, mask=mask, return_lse=False)
        else:
            if not g.ran:
                raise RuntimeError(f"{_PRE}layer {self.layer_idx} shares the attention of anchor layer {g.anchor}, "
                                   "which has not run in this forward pass (run the decoder stack in order, anchor "
                                   "first)")
            if g.q.shape[0] != B or g.q.shape[2] != T:
                raise ValueError(f"{_PRE}layer {self.layer_idx} got (batch, seq) = {(B, T)} but its anchor layer "
                                 f"{g.anchor} ran with {(g.q.shape[0], g.q.shape[2])}")
            if cache is not None:
                _, v = cache.update(g.k_new, v, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
            if self._materialize(g):
                if g.probs is None:
                    g.probs = shared_attention_probs(g.q, g.k, g.lse, causal=g.causal, scale=self.scaling,
                                                     mask=g.mask)
                out = shared_attention(g.q, g.k, g.lse, v, causal=g.causal, scale=self.scaling, mask=g.mask,
                                       probs=g.probs)
            else:
                if g.shared is None:
                    g.shared = SharedAttentionGroup(g.q, g.k, g.lse, causal=g.causal, scale=self.scaling, mask=g.mask)
                out = g.shared(v)
            if g.sharers and self.layer_idx == g.sharers[-1]:
                g.clear()  # the group is done: autograd keeps what the backward needs
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), None


def find_decoder_layers(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """(the module owning the decoder stack, the stack): the first nn.ModuleList whose items have `self_attn`."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) and all(hasattr(x, "self_attn") for x in child):
                return module, child
    raise ValueError(f"{_PRE}no decoder stack found in {type(model).__name__}: expected an nn.ModuleList of layers "
                     "with a `self_attn` each (Hugging Face Llama-family models: LlamaForCausalLM, MistralForCausalLM, "
                     "Qwen2ForCausalLM, ...)")


def check_groups(groups, num_layers: int) -> List[List[int]]:
    """Groups must be contiguous runs of layers, in order, covering 0 .. num_layers - 1 exactly once; the first
    layer of each group is its anchor."""
    out, expect = [], 0
    for gi, grp in enumerate(groups):
        grp = [int(x) for x in grp]
        if not grp:
            raise ValueError(f"{_PRE}group {gi} is empty")
        if grp != list(range(grp[0], grp[0] + len(grp))):
            raise ValueError(f"{_PRE}group {gi} must be a contiguous run of layers in order (anchor first): got {grp}")
        if grp[0] != expect:
            raise ValueError(f"{_PRE}groups must cover the layers 0 .. {num_layers - 1} in order, each once: group "
                             f"{gi} starts at layer {grp[0]}, expected {expect}")
        expect = grp[-1] + 1
        out.append(grp)
    if expect != num_layers:
        raise ValueError(f"{_PRE}groups must cover the layers 0 .. {num_layers - 1} in order, each once: they end at "
                         f"layer {expect - 1}")
    return out


class _EchoPassStart:
    """Forward pre-hook of the decoder stack's owner: clears every group at the start of a pass (so a sharing
    layer can never read an earlier pass's anchor) and refuses gradient checkpointing."""

    def __init__(self, groups: List[EchoGroup]):
        self.groups = groups

    def __call__(self, module, args):
        if getattr(module, "gradient_checkpointing", False) and module.training:
            raise RuntimeError(f"{_PRE}gradient checkpointing is not supported by an EchoAtt model (the anchor's Q, K "
                               "and LSE cross layer boundaries); call model.gradient_checkpointing_disable()")
        for g in self.groups:
            g.clear()


def convert_to_echoatt(model: nn.Module, groups, *, mode: str = "auto", memory_budget: Optional[int] = None,
                       inplace: bool = False) -> nn.Module:
    """An EchoAtt student from a Hugging Face Llama-family model: a copy of `model` (inplace=False) whose
    decoder layers are grouped as `groups` (e.g. [[0], [1, 2, 3], [4], ...] or plan_groups' result): every
    group's first layer is an anchor, the others share its attention and lose their W_q / W_k. All other
    weights are the teacher's. `model.config.echoatt_groups` records the groups (to rebuild the structure
    before loading a saved state dict: convert a freshly built model with the same groups, then load).

    Refused: attention dropout > 0, sliding-window attention, gradient checkpointing (at run time).
    """
    if mode not in MODES:
        raise ValueError(f"{_PRE}mode must be one of 'auto', 'recompute', 'materialize': got '{mode}'")
    owner, layers = find_decoder_layers(model)
    groups = check_groups(groups, len(layers))
    config = getattr(model, "config", None)
    if config is not None:
        if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
            raise ValueError(f"{_PRE}attention dropout is not supported: config.attention_dropout = "
                             f"{config.attention_dropout} (set it to 0)")
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True):
            raise ValueError(f"{_PRE}sliding-window attention is not supported: config.sliding_window = {window}")
    if not inplace:
        model = copy.deepcopy(model)
        owner, layers = find_decoder_layers(model)
        config = getattr(model, "config", None)
    states = []
    for grp in groups:
        state = EchoGroup(grp[0], grp[1:])
        states.append(state)
        for j, idx in enumerate(grp):
            attn = layers[idx].self_attn
            if isinstance(attn, EchoAttention):
                raise ValueError(f"{_PRE}layer {idx} is already an EchoAttention (convert the original model)")
            layers[idx].self_attn = EchoAttention.from_hf(attn, config, role="anchor" if j == 0 else "shared",
                                                          group=state, mode=mode, memory_budget=memory_budget)
            layers[idx].self_attn.layer_idx = idx
    owner.register_forward_pre_hook(_EchoPassStart(states))
    if config is not None:
        config.echoatt_groups = [list(g) for g in groups]
    return model


def removed_parameters(model: nn.Module, groups) -> int:
    """How many parameters convert_to_echoatt(model, groups) removes: W_q and W_k (with biases and Q/K norms)
    of every sharing layer."""
    _, layers = find_decoder_layers(model)
    total = 0
    for grp in check_groups(groups, len(layers)):
        for idx in grp[1:]:
            attn = layers[idx].self_attn
            for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
                mod = getattr(attn, name, None)
                if isinstance(mod, nn.Module):
                    total += sum(p.numel() for p in mod.parameters())
    return total
