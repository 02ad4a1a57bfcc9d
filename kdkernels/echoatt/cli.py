"""`kdkernels echoatt-analyze [MODEL]`: a model's layer-by-layer attention similarity, suggested EchoAtt groups
and a heatmap PNG."""
from __future__ import annotations

import argparse
import sys

_EPILOG = """\
model: a Hugging Face causal LM directory or hub id (Llama family: Llama, Mistral without sliding window,
Qwen2/3, TinyLlama, ...), loaded with AutoModelForCausalLM (needs transformers: pip install 'kdkernels[hf]').
Without one, a tiny random Llama is built from a config (random weights: a demonstration of the tool only).

The input is --text (tokenized by the model's tokenizer when it has one) or --tokens random token ids.

example:
  python -m kdkernels echoatt-analyze ./TinyLlama-1.1B --text "$(cat some.txt)" --n-shared 9 --out sim.png
"""


def add_parser(sub) -> None:
    """Add `echoatt-analyze` to the subparsers of `python -m kdkernels`."""
    p = sub.add_parser("echoatt-analyze", help="layer-by-layer attention similarity of a model, EchoAtt groups and "
                       "a heatmap", description="Print the (L, L) attention similarity of a model's decoder layers "
                       "(streamed: no T x T map is stored), suggest EchoAtt groups and write a heatmap PNG.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="Hugging Face model directory or hub id (default: a tiny "
                   "random Llama built from a config)")
    p.add_argument("--text", default=None, help="input text (default: random token ids)")
    p.add_argument("--tokens", type=int, default=128, metavar="T", help="random tokens per sequence when no --text "
                   "is given (default: 128)")
    p.add_argument("--batch", type=int, default=2, metavar="B", help="random sequences (default: 2)")
    p.add_argument("--metric", choices=("js", "cosine"), default="js", help="row similarity (default: js)")
    p.add_argument("--threshold", type=float, default=None, help="group layers whose similarity to the group's "
                   "anchor is >= this")
    p.add_argument("--n-shared", type=int, default=None, metavar="N", help="plan exactly N sharing layers "
                   "(default: a threshold of 0.8 when neither is given)")
    p.add_argument("--out", default="echoatt_similarity.png", metavar="PNG", help="heatmap path "
                   "(default: echoatt_similarity.png)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=run)


def _tiny_llama(seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init attends almost uniformly (every layer alike); sharpen W_q / W_k, and let layers 2-4 start from
    # layer 1's W_q / W_k plus noise, so the demonstration shows a run of similar layers.
    layers = model.model.layers
    with torch.no_grad():
        wq, wk = layers[1].self_attn.q_proj.weight.clone(), layers[1].self_attn.k_proj.weight.clone()
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if i in (2, 3, 4):
                attn.q_proj.weight.copy_(wq + 0.2 * wq.std() * torch.randn_like(wq))
                attn.k_proj.weight.copy_(wk + 0.2 * wk.std() * torch.randn_like(wk))
            attn.q_proj.weight.mul_(8.0)
            attn.k_proj.weight.mul_(8.0)
    return model, None


def _load(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:  # a model directory without a tokenizer: random ids then
        tok = None
    return model.eval(), tok


def run(args) -> int:
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("kdkernels echoatt-analyze: needs transformers (pip install 'kdkernels[hf]')", file=sys.stderr)
        return 2
    from . import format_similarity, layer_similarity, plan_groups, plot_similarity

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is None:
        print("no model given: using a tiny random Llama built from a config (6 layers, random weights with "
              "layers 2-4 seeded from layer 1's W_q / W_k; a demonstration of the tool, not a measurement of a "
              "real model)")
        model, tok = _tiny_llama(args.seed)
    else:
        model, tok = _load(args.model)
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(args.seed)
    if args.text is not None and tok is not None:
        enc = tok([args.text], return_tensors="pt")
        ids, am = enc["input_ids"], enc.get("attention_mask")
    else:
        if args.text is not None:
            print("the model has no tokenizer: using random token ids instead of --text")
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=g)
        am = None
    ids = ids.to(device)
    am = am.to(device) if am is not None else None
    S = layer_similarity(model, ids, am, metric=args.metric)
    L = S.shape[0]
    print(f"attention similarity ({args.metric}) of {L} layers on {tuple(ids.shape)} tokens:")
    print(format_similarity(S))
    if args.n_shared is not None:
        groups = plan_groups(S, n_shared=args.n_shared)
        how = f"n_shared={args.n_shared}"
    else:
        t = 0.8 if args.threshold is None else args.threshold
        groups = plan_groups(S, threshold=t)
        how = f"threshold={t}"
    print(f"suggested groups ({how}; anchor first): {groups}")
    print(f"sharing layers: {sum(len(x) - 1 for x in groups)} of {L}")
    try:
        plot_similarity(S, args.out, title=f"attention similarity ({args.metric})", groups=groups)
        print(f"heatmap written to {args.out}")
    except ImportError as e:  # matplotlib missing: the analysis above is the result, the picture optional
        print(f"heatmap not written: {e}")
    return 0
