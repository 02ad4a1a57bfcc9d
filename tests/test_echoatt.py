"""Tests of kdkernels.echoatt: layer similarity of a model, group planning, the heatmap, EchoAttention and the
conversion of tiny random Hugging Face Llama models (built from configs: no download; skipped without
transformers)."""

import inspect
import os
import re
import struct

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network

import pytest  # noqa: E402
import torch  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.echoatt import (EchoAttention, EchoGroup, convert_to_echoatt, layer_similarity, plan_groups,  # noqa: E402
                               plot_similarity, removed_parameters)
from kdkernels.reference import shared_attention_ref  # noqa: E402


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    try:
        import transformers
    except ImportError:
        yield
        return
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def tiny_llama(layers=5, impl="sdpa", seed=0, sharp=1.0, bias=False, dtype=torch.float32, device="cpu"):
    """A random LlamaForCausalLM; sharp scales W_q / W_k so the attention maps are far from uniform."""
    transformers = _transformers()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=bias, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = impl
    model = transformers.LlamaForCausalLM(cfg)
    if sharp != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(sharp)
                layer.self_attn.k_proj.weight.mul_(sharp)
    return model.to(device=device, dtype=dtype).eval()


def batch(B=2, T=11, pad=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    if pad:
        am[1, :3] = 0  # left padding
    return ids.to(device), am.to(device)


# ---------------------------------------------------------------------------------------------
# Conversion: groups of one reproduce the model; sharing removes exactly W_q / W_k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_groups_of_one_equal_original(device, impl, pad):
    model = tiny_llama(impl=impl, sharp=3.0, device=device)
    ids, am = batch(pad=pad, device=device)
    student = convert_to_echoatt(model, [[i] for i in range(5)])
    assert all(isinstance(layer.self_attn, EchoAttention) for layer in student.model.layers)
    assert not any(isinstance(layer.self_attn, EchoAttention) for layer in model.model.layers)  # a copy
    ref = model(ids, attention_mask=am).logits
    out = student(ids, attention_mask=am).logits
    valid = am.bool()  # padded query rows see no key: kdkernels gives 0 there, torch's attention does not
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    if not pad:
        ref.square().mean().backward()
        out.square().mean().backward()
        for (name, a), b in zip(model.named_parameters(), student.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_sharing_removes_exactly_wq_wk(device, bias):
    model = tiny_llama(layers=6, bias=bias, device=device)
    groups = [[0], [1, 2, 3], [4, 5]]
    student = convert_to_echoatt(model, groups)
    n_model = sum(p.numel() for p in model.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    hidden, H, Hk, d = 32, 4, 2, 8
    per_layer = hidden * H * d + hidden * Hk * d + ((H + Hk) * d if bias else 0)
    assert n_model - n_student == 3 * per_layer == removed_parameters(model, groups)
    for i in (2, 3, 5):
        attn = student.model.layers[i].self_attn
        assert attn.role == "shared" and not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj")
    assert student.config.echoatt_groups == groups
    ids, am = batch(device=device)
    student.train()
    out = student(ids, attention_mask=am).logits
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    layers = student.model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[3].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_sharing_layers_apply_the_anchor_attention(device):
    """Every sharing layer's output is o_proj(softmax(Q_a K_a^T + mask) V_l) with its anchor's Q_a, K_a."""
    model = tiny_llama(layers=5, sharp=3.0, device=device)
    student = convert_to_echoatt(model, [[0, 1], [2, 3, 4]])
    ids, am = batch(device=device)
    seen = []

    def pre(mod, args, kwargs):
        g = mod.group
        mod._captured = (g.q, g.k, g.mask, g.causal)

    def post(mod, args, kwargs, output):
        h = kwargs["hidden_states"]
        q, k, mask, causal = mod._captured
        v = mod.v_proj(h).view(h.shape[0], h.shape[1], -1, mod.head_dim).transpose(1, 2)
        ref = shared_attention_ref(q.double(), k.double(), v.double(), causal=causal, scale=mod.scaling,
                                   mask=None if mask is None else mask.cpu() if device == "cpu" else mask)
        ref = mod.o_proj(ref.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1).to(h.dtype))
        torch.testing.assert_close(output[0], ref, rtol=1e-5, atol=1e-5)
        seen.append(mod.layer_idx)

    for i in (1, 3, 4):
        attn = student.model.layers[i].self_attn
        attn.register_forward_pre_hook(pre, with_kwargs=True)
        attn.register_forward_hook(post, with_kwargs=True)
    student(ids, attention_mask=am)
    assert seen == [1, 3, 4]


def test_modes_agree(device):
    model = tiny_llama(layers=5, sharp=2.0, device=device)
    ids, am = batch(device=device)
    groups = [[0], [1, 2, 3], [4]]
    results = []
    for mode, budget in (("recompute", None), ("materialize", None), ("auto", 0), ("auto", None)):
        student = convert_to_echoatt(model, groups, mode=mode, memory_budget=budget)
        out = student(ids, attention_mask=am).logits
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in student.parameters()]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kv_cache_matches_full_forward(device):
    model = tiny_llama(layers=5, sharp=2.0, device=device)
    ids, _ = batch(B=1, T=9, pad=False, device=device)
    student = convert_to_echoatt(model, [[0], [1, 2, 3], [4]])
    full = student(ids).logits[:, -1]
    pre = student(ids[:, :-1], use_cache=True)
    cache = getattr(pre, "cache", None) or getattr(pre, "past_key_values", None)
    key = "cache" if "cache" in inspect.signature(type(student.model).forward).parameters else "past_key_values"
    step = student(ids[:, -1:], use_cache=True, **{key: cache}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    # groups of one: greedy generation equals the original model's
    same = convert_to_echoatt(model, [[i] for i in range(5)])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(same.generate(ids, **kw), model.generate(ids, **kw))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,msg", [
    ([[0], [2, 1], [3, 4]], "group 1 must be a contiguous run of layers in order (anchor first): got [2, 1]"),
    ([[0], [2, 3, 4]], "groups must cover the layers 0 .. 4 in order, each once: group 1 starts at layer 2, expected 1"),
    ([[0, 1], [2]], "groups must cover the layers 0 .. 4 in order, each once: they end at layer 2"),
    ([[0], [], [1, 2, 3, 4]], "group 1 is empty"),
])
def test_bad_groups(groups, msg):
    model = tiny_llama(layers=5)
    with pytest.raises(ValueError, match=re.escape(f"kdkernels.echoatt: {msg}")):
        convert_to_echoatt(model, groups)


def test_refusals_dropout_checkpointing_and_order(device):
    transformers = _transformers()
    model = tiny_llama(layers=4, device=device)
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: attention dropout is not supported")):
        convert_to_echoatt(model, [[0, 1], [2, 3]])
    model.config.attention_dropout = 0.0
    student = convert_to_echoatt(model, [[0, 1], [2, 3]])
    enable = getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)
    enable()
    student.train()
    ids, am = batch(device=device)
    with pytest.raises(RuntimeError, match=re.escape("kdkernels.echoatt: gradient checkpointing is not supported")):
        student(ids, attention_mask=am)
    getattr(student, "activation_checkpointing_disable", student.gradient_checkpointing_disable)()
    student.eval()
    student(ids, attention_mask=am)
    # a sharing layer run on its own, without its anchor in this pass
    sharer = student.model.layers[3].self_attn
    h = torch.randn(2, 11, 32, device=device)
    pe = student.model.rotary_emb(h, torch.arange(11, device=device)[None])
    with pytest.raises(RuntimeError, match=re.escape("kdkernels.echoatt: layer 3 shares the attention of anchor "
                                                     "layer 2, which has not run in this forward pass")):
        sharer(h, position_embeddings=pe)
    anchor = student.model.layers[2].self_attn
    anchor(h, position_embeddings=pe)
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: layer 3 got (batch, seq) = (2, 10) but its "
                                                   "anchor layer 2 ran with (2, 11)")):
        sharer(h[:, :10], position_embeddings=tuple(x[:, :10] for x in pe))
    cfg = transformers.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: sliding-window attention is not supported")):
        convert_to_echoatt(transformers.MistralForCausalLM(cfg), [[0, 1]])


# ---------------------------------------------------------------------------------------------
# Analysis: the streamed similarity of a model vs its own materialised attention maps
# ---------------------------------------------------------------------------------------------


def _similarity_from_maps(maps, valid, metric):
    L = len(maps)
    out = torch.empty(L, L, dtype=torch.float64)
    for a in range(L):
        for b in range(L):
            pa, pb = maps[a].double(), maps[b].double()
            if metric == "cosine":
                s = (pa * pb).sum(-1) / (pa.norm(dim=-1) * pb.norm(dim=-1))
            else:
                m = 0.5 * (pa + pb)
                kl = lambda p: torch.where(p > 0, p * (p.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), 0.0)
                s = 1 - 0.5 * (kl(pa) + kl(pb)).sum(-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
            out[a, b] = s[valid].mean()
    return out


@pytest.mark.parametrize("metric", ["js", "cosine"])
def test_layer_similarity_matches_materialised_maps(metric):
    model = tiny_llama(layers=4, impl="eager", sharp=15.0)
    ids, am = batch(B=2, T=13)
    S = layer_similarity(model, ids, am, metric=metric)
    with torch.no_grad():
        maps = model(ids, attention_mask=am, output_attentions=True).attentions  # eager: (B, H, T, T) per layer
    # rows with a visible key: every non-padded query (a left-padded query sees only padding)
    valid = am.bool()[:, None, :].expand(2, 4, 13)
    ref = _similarity_from_maps([m for m in maps], valid, metric)
    torch.testing.assert_close(S.double(), ref, rtol=1e-4, atol=1e-4)
    assert S.min() < 0.95  # the maps differ between layers: not a trivial all-ones matrix


# ---------------------------------------------------------------------------------------------
# Planning and plotting (no transformers needed)
# ---------------------------------------------------------------------------------------------


def _S():
    S = torch.full((8, 8), 0.3, dtype=torch.float64)
    for a, b in [(1, 2), (1, 3), (2, 3), (4, 5), (5, 6), (4, 6), (0, 1), (6, 7)]:
        S[a, b] = S[b, a] = 0.9
    S[1, 3] = S[3, 1] = 0.85
    S[4, 6] = S[6, 4] = 0.82
    S.fill_diagonal_(1.0)
    return S


def test_plan_groups_threshold_and_n_shared():
    S = _S()
    assert plan_groups(S, threshold=0.8) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert plan_groups(S, threshold=0.88) == [[0], [1, 2], [3], [4, 5], [6], [7]]
    assert plan_groups(S, threshold=0.8, keep_first=0, keep_last=0) == [[0, 1], [2, 3], [4, 5, 6], [7]]
    assert plan_groups(S, n_shared=4) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    g3 = plan_groups(S, n_shared=3)  # the least similar tail (4 -> 6, 0.82) is split off
    assert g3 == [[0], [1, 2, 3], [4, 5], [6], [7]]
    assert plan_groups(S, n_shared=0) == [[i] for i in range(8)]
    assert sum(len(g) - 1 for g in plan_groups(S, n_shared=5)) == 5
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: n_shared must be in [0, 5] for 8 layers")):
        plan_groups(S, n_shared=6)
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: plan_groups takes exactly one of threshold or "
                                                   "n_shared")):
        plan_groups(S)
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: similarity must be a square (L, L) matrix")):
        plan_groups(torch.zeros(3, 4), threshold=0.5)


def _png_size(path):
    """(width, height) of a PNG file, checking its signature."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_similarity(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    S = _S()
    S[0, 7] = S[7, 0] = float("nan")
    path = plot_similarity(S, str(tmp_path / "s.png"), groups=plan_groups(_S(), threshold=0.8))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 50  # the group outlines


# ---------------------------------------------------------------------------------------------
# EchoAttention on its own, the CLI, a distillation step
# ---------------------------------------------------------------------------------------------


def test_echo_attention_standalone(device):
    torch.manual_seed(0)
    group = EchoGroup(0, [1])
    anchor = EchoAttention(32, 4, 2, role="anchor", group=group, layer_idx=0).double().to(device)
    sharer = EchoAttention(32, 4, 2, role="shared", group=group, layer_idx=1).double().to(device)
    h0, h1 = torch.randn(2, 2, 7, 32, dtype=torch.float64, device=device)
    cos, sin = torch.randn(2, 1, 7, 8, dtype=torch.float64, device=device).unbind(0)
    out0, _ = anchor(h0, position_embeddings=(cos.expand(2, 7, 8), sin.expand(2, 7, 8)))
    out1, _ = sharer(h1)
    assert group.q is None  # cleared after the group's last sharing layer
    q = anchor.q_proj(h0).view(2, 7, 4, 8).transpose(1, 2)
    k = anchor.k_proj(h0).view(2, 7, 2, 8).transpose(1, 2)
    from kdkernels.echoatt import apply_rope

    q, k = apply_rope(q, k, cos.expand(2, 7, 8), sin.expand(2, 7, 8))
    v1 = sharer.v_proj(h1).view(2, 7, 2, 8).transpose(1, 2)
    ref = sharer.o_proj(shared_attention_ref(q.cpu(), k.cpu(), v1.cpu(), causal=True).to(device)
                        .transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out1, ref)
    with pytest.raises(ValueError, match=re.escape("kdkernels.echoatt: role must be 'anchor' or 'shared': got 'x'")):
        EchoAttention(32, 4, role="x")


def test_cli_echoatt_analyze(tmp_path, capsys):
    transformers = _transformers()
    from kdkernels.__main__ import main

    out = tmp_path / "sim.png"
    assert main(["echoatt-analyze", "--tokens", "24", "--batch", "1", "--out", str(out), "--n-shared", "2"]) == 0
    text = capsys.readouterr().out
    assert "no model given: using a tiny random Llama built from a config" in text
    assert "attention similarity (js) of 6 layers" in text and "suggested groups (n_shared=2" in text
    _png_size(str(out))
    model_dir = tmp_path / "model"
    tiny_llama(layers=3).save_pretrained(str(model_dir))
    assert main(["echoatt-analyze", str(model_dir), "--tokens", "16", "--metric", "cosine", "--out",
                 str(tmp_path / "m.png"), "--threshold", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "attention similarity (cosine) of 3 layers" in text and "no model given" not in text
    assert transformers is not None


def test_distillation_step_with_topk_kl():
    teacher = tiny_llama(layers=5, sharp=2.0)
    student = convert_to_echoatt(teacher, [[0], [1, 2, 3], [4]])
    student.train()
    ids, am = batch(B=4, T=12, pad=False)
    with torch.no_grad():
        values, idx = kdkernels.teacher_topk(teacher(ids).logits, 8)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = kdkernels.topk_kl_div(student(ids).logits, values, idx, mode="tail", values_are="logprobs")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
