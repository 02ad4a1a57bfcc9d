"""End-to-end distillation demo: a small teacher LM, then students trained with hard labels vs. each KD loss."""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdkernels

# Python's own documentation ships with every CPython (pydoc_data), so the demo needs no download.
_PIECE_RE = re.compile(r" ?[A-Za-z_]+| ?\d| ?[^\sA-Za-z_\d]+|\s+")


def load_text() -> str:
    from pydoc_data.topics import topics

    # Sorted so the corpus (and hence every number the demo prints) is the same from run to run.
    return "\n".join(topics[k] for k in sorted(topics))


class Tokenizer:
    """Word pieces (a leading space kept, as GPT-2 does) plus a 256-entry byte fallback.

    Why not bytes alone: with V = 256 a top-k of 16..64 is a large part of the vocabulary and the
    sparse-teacher question (how to treat the mass outside the top-k) barely arises. Why not a trained
    BPE: a pure-Python BPE trainer costs tens of seconds on this corpus. The most frequent ~2k pieces
    cover ~91% of the pieces of the corpus (4k cover 97%); the rest is spelled in bytes, so every text
    round-trips. A few thousand entries keep the output layer, which dominates a tiny LM's cost, cheap
    enough for two CPU cores while K = 32 stays a small fraction of V.
    """

    def __init__(self, text: str, vocab_size: int):
        if vocab_size <= 256:
            raise ValueError(f"vocab_size must be > 256 (the byte fallback): got {vocab_size}")
        counts = collections.Counter(_PIECE_RE.findall(text))
        # Ties broken by the piece itself so the vocabulary never depends on hash order.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.pieces = [p for p, _ in ranked[: vocab_size - 256]]
        self.piece_id = {p: 256 + i for i, p in enumerate(self.pieces)}
        self.vocab_size = 256 + len(self.pieces)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in _PIECE_RE.findall(text):
            i = self.piece_id.get(piece)
            if i is None:
                out.extend(piece.encode("utf-8"))
            else:
                out.append(i)
        return out

    def decode(self, ids) -> str:
        buf = bytearray()
        for i in ids:
            i = int(i)
            buf.extend(bytes([i]) if i < 256 else self.pieces[i - 256].encode("utf-8"))
        return buf.decode("utf-8", errors="replace")


class Block(nn.Module):
    """Pre-LayerNorm transformer block; causal attention through scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyLM(nn.Module):
    """Causal LM with learned positions and an output layer tied to the embedding."""

    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def hidden(self, idx):
        """The last hidden state (B, L, d): what the fused losses take, with the head's weight self.tok.weight."""
        x = self.drop(self.tok(idx) + self.pos[: idx.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)

    def forward(self, idx):
        self.last_hidden = self.hidden(idx)  # kept for the feature-level (token-relation) distillation
        return self.last_hidden @ self.tok.weight.t()


@dataclass
class Config:
    # Sized for two CPU cores: ~48 ms per teacher step and ~20 ms per student step there, about 1.5-2 min
    # in all. The student is a quarter of the teacher's width with one layer, so the teacher has
    # something to teach; the teacher trains 2.5x longer, with dropout, on the same windows.
    vocab: int = 2048
    seq: int = 64
    batch: int = 16
    t_dim: int = 128
    t_layers: int = 2
    t_heads: int = 4
    t_steps: int = 1000
    t_lr: float = 3e-3
    s_dim: int = 64
    s_layers: int = 1
    s_heads: int = 2
    s_steps: int = 400
    s_lr: float = 3e-3
    dropout: float = 0.1
    k: int = 32
    temperature: float = 1.0
    kd_weight: float = 1.0


# --quick (~30 s on two cores): the same models, fewer steps.
QUICK = dict(t_steps=300, s_steps=150)


class PeakMemory:
    """Peak memory of a block: the CUDA allocator's peak, or on CPU the process's peak resident size.

    Both are taken above the allocated/resident size at the start of the block, so they count what a
    training step adds (activations, gradients, the loss's buffers, Adam's state on the first step).
    On CPU the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs (the caller
    first releases glibc's free pages: release_free_memory); where Linux refuses the reset,
    ru_maxrss (never reset) is the fallback.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.label = "CUDA max allocated above start" if device.type == "cuda" else "CPU peak RSS above start"

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        rss = self._status_kib("VmRSS")
        self.start = (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = self._status_kib("VmHWM") if self.reset else None
            peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.peak_mib = max(peak - self.start, 0) / 2**20
        return False


def release_free_memory(pin: bool = False) -> None:
    """Hand glibc's free heap pages back to the OS, so the next block's peak RSS counts its own pages.

    pin=True also has glibc serve every allocation above 64 KiB by its own mmap, unmapped on free:
    by default glibc keeps freed tensors' pages resident for reuse, and the peak RSS of a later run
    says nothing about that run. The page faults this costs would skew the ms/step column, so it is
    switched on only for the memory pass after all timings (it cannot be switched back).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if pin:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Progress:
    """One redrawn line on a terminal; otherwise a line every tenth of the run (logs, pytest capture)."""

    def __init__(self, name: str, total: int, quiet: bool = False):
        self.name, self.total, self.quiet = name, total, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.every = max(total // 10, 1)

    def update(self, done: int, loss: float):
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            if done % max(self.total // 100, 1) and done != self.total:
                return  # redraw ~100 times, not every step
            bar = "#" * (24 * done // self.total)
            sys.stderr.write(f"\r{self.name:<12} [{bar:<24}] {done}/{self.total} loss {loss:.3f} {elapsed:5.1f}s")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done % self.every == 0 or done == self.total:
            print(f"{self.name}: step {done}/{self.total} loss {loss:.3f} ({elapsed:.1f}s)", file=sys.stderr,
                  flush=True)


def make_chunks(ids: list[int], seq: int):
    """Cut the token stream into fixed (seq+1)-token windows; every tenth goes to validation.

    Fixed windows (rather than random offsets) let the offline teacher cache be keyed by window index.
    Interleaving the validation windows keeps both splits drawn from every documentation topic (the
    topics are sorted by name, so a tail split would test on different subjects).
    """
    n = len(ids) // (seq + 1)
    data = torch.tensor(ids[: n * (seq + 1)], dtype=torch.long).view(n, seq + 1)
    is_val = torch.arange(n) % 10 == 0
    return data[~is_val], data[is_val]


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(total // 20, 1)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1))))


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """The window indices of every step, drawn once so all students see the same data in the same order."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch
    perms = [torch.randperm(n_train, generator=g) for _ in range(need // n_train + 1)]
    return torch.cat(perms)[:need].view(steps, batch)


@torch.no_grad()
def val_perplexity(model: nn.Module, val: torch.Tensor, device: torch.device, batch: int, amp) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.shape[0], batch):
        x = val[i : i + batch].to(device)
        with amp():
            logits = model(x[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def hard_label_loss(step, x, model, amp):
    """The baseline every method starts from: eager cross-entropy on the full logits."""
    with amp():
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def train(model, train_data, order, cfg: Config, device, amp, *, lr: float, name: str, loss_fn=hard_label_loss,
          quiet=False, curve=None):
    """Train in place; `loss_fn(step, x, model, amp)` returns the step's whole loss (CE and any KD terms).

    Returns the median milliseconds per step (the first steps, which pay for lazy initialisation, left out).
    curve: optional (every, fn(model) -> val loss, list to append (step, loss) to), for the loss-curve plot.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = order.shape[0]
    prog = Progress(name, steps, quiet)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, lr)
        x = train_data[order[step]].to(device, non_blocking=True)
        loss = loss_fn(step, x, model, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        prog.update(step + 1, loss.item())  # free after the synchronize above
        if curve is not None and ((step + 1) % curve[0] == 0 or step + 1 == steps):
            curve[2].append((step + 1, curve[1](model)))  # outside the timed part of the step
    skip = min(3, len(times) - 1)
    return 1000 * sorted(times[skip:])[len(times[skip:]) // 2]


def _cache_worker(rank, world, port, teacher, seqs, path, kw):
    """One rank of build_teacher_cache: a gloo group over localhost, then the multi-rank build_cache."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from .cache import build_cache
        build_cache(teacher, seqs, path, **kw)
    finally:
        torch.distributed.destroy_process_group()


def build_teacher_cache(teacher, seqs, path, nproc: int = 1, **kw) -> None:
    """build_cache in this process, or (nproc > 1, CPU) in nproc processes sharing the shards as torchrun
    ranks do (kdkernels/cache/distributed.py): the same cache either way."""
    from .cache import build_cache

    if nproc <= 1:
        build_cache(teacher, seqs, path, **kw)
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kw = dict(kw, device="cpu")
    torch.multiprocessing.spawn(_cache_worker, args=(nproc, port, copy.deepcopy(teacher).cpu(), seqs, path, kw),
                                nprocs=nproc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kdkernels demo",
        description="Train a small teacher LM on Python's bundled documentation, then a smaller student five "
        "ways from one initialisation: hard labels only, + top-k KL (mode='renorm', teacher top-k on the fly), "
        "+ top-k KL (mode='tail', an offline cache of teacher top-k log-probs), + that and SinKD (token-level "
        "Sinkhorn), + that and a token-relation KL on hidden states. The top-k KL students run on the fused path "
        "(CE and KD from the hidden state and the output layer, no full logits), SinKD's on the logits. Prints a markdown table and writes a PNG "
        "of the validation loss curves.",
    )
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="student training steps (teacher: 2.5x)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps")
    p.add_argument("--quick", action="store_true",
                   help="~30 s on two idle CPU cores: the same models, fewer steps (used by the tests)")
    p.add_argument("--k", type=int, default=None, help="teacher top-k (default 32)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1.0)")
    p.add_argument("--kd-weight", type=float, default=None, help="loss = CE + w * KD (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--nproc", type=int, default=1, help="processes that build the teacher cache (CPU, gloo; "
                   "each a share of the shards, as torchrun ranks; default 1)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--plot", default="kdkernels_demo_curves.png",
                   help="PNG of the students' validation loss curves ('' for none; default: %(default)s)")
    a = p.parse_args(argv)

    cfg = Config(**QUICK) if a.quick else Config()
    if a.steps is not None:
        cfg.s_steps = a.steps
        cfg.t_steps = int(2.5 * a.steps)
    if a.teacher_steps is not None:
        cfg.t_steps = a.teacher_steps
    for name in ("k", "temperature", "kd_weight"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        # bf16 autocast is how such students are trained on GPUs, and it gives the loss bf16 logits.
        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        amp = contextlib.nullcontext  # float32 on CPU: CPU autocast would time bf16 emulation, not the loss

    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    text = load_text()
    tok = Tokenizer(text, cfg.vocab)
    train_data, val_data = make_chunks(tok.encode(text), cfg.seq)
    log(f"corpus: {len(text)} chars -> {train_data.numel() + val_data.numel()} tokens, vocab {tok.vocab_size}, "
        f"{train_data.shape[0]} train / {val_data.shape[0]} val windows of {cfg.seq}; device {device}, "
        f"{torch.get_num_threads()} CPU threads")
    V = tok.vocab_size

    # Teacher: wider, deeper, trained longer, with dropout so it generalises rather than memorises.
    teacher = TinyLM(V, cfg.seq, cfg.t_dim, cfg.t_layers, cfg.t_heads, cfg.dropout).to(device)
    t_order = batch_order(train_data.shape[0], cfg.t_steps, cfg.batch, a.seed + 1)
    t_ms = train(teacher, train_data, t_order, cfg, device, amp, lr=cfg.t_lr, name="teacher", quiet=a.quiet)
    teacher.eval()
    t_ppl = val_perplexity(teacher, val_data, device, 64, amp)
    log(f"teacher: val ppl {t_ppl:.2f}, {t_ms:.1f} ms/step")

    s_order = batch_order(train_data.shape[0], cfg.s_steps, cfg.batch, a.seed + 2)

    # Offline cache for the 'tail' students: the teacher's top-k log-probs at temperature T, written once
    # with kdkernels.cache (checksummed, memory-mapped shards: the format a real pipeline uses) and read
    # back every step. To keep the demo short only the windows the students will see go through the teacher.
    from .cache import TeacherCache, build_cache

    used = torch.unique(s_order)
    slot = torch.full((train_data.shape[0],), -1, dtype=torch.long)
    slot[used] = torch.arange(used.numel())
    cache_dir = tempfile.mkdtemp(prefix="kdkernels_demo_cache_")
    t0 = time.perf_counter()
    build_teacher_cache(teacher, [w[:-1].tolist() for w in train_data[used]], cache_dir, a.nproc, k=cfg.k,
                        temperature=cfg.temperature, vocab_size=V, device=device, batch_size=64)
    seconds = time.perf_counter() - t0
    cache = TeacherCache(cache_dir, vocab_size=V, k=cfg.k)
    log(f"teacher top-{cfg.k} cache: {cache.bytes_per_token:.0f} bytes/token (vs {V * 2} for dense bf16 logits), "
        f"{cache.num_tokens} tokens in {seconds:.1f}s ({cache.num_tokens / seconds:.0f} tokens/s"
        f"{f', {a.nproc} processes' if a.nproc > 1 else ''})")

    torch.manual_seed(a.seed + 3)
    student0 = TinyLM(V, cfg.seq, cfg.s_dim, cfg.s_layers, cfg.s_heads, 0.0)

    # The KD students on the fused path (kdkernels.linear_distill_loss): the student's last hidden state and
    # its output layer's weight go in, the hard-label CE and the top-k KL come out of one chunked pass, and
    # the (B*L, V) logits are never held. The teacher's top-k on the fly comes from its hidden state the same
    # way (linear_teacher_topk). SinKD needs both full distributions, so its student stays on the logits.
    def fused(model, x, amp, values, ids, mode, values_are):
        with amp():
            hidden = model.hidden(x[:, :-1])
        loss, _ = kdkernels.linear_distill_loss(hidden, model.tok.weight, x[:, 1:], values, ids, ce_weight=1.0,
                                                kd_weight=cfg.kd_weight, mode=mode, values_are=values_are,
                                                temperature=cfg.temperature)
        return loss, hidden

    def teacher_topk_on_the_fly(x):
        with torch.no_grad(), amp():
            th = teacher.hidden(x[:, :-1])
        return th, kdkernels.linear_teacher_topk(th, teacher.tok.weight, cfg.k, temperature=cfg.temperature)

    def cached_topk(step):
        b = cache.batch(slot[s_order[step]].tolist())
        return b.values.to(device, non_blocking=True), b.ids.to(device, non_blocking=True)

    def kd_renorm(step, x, model, amp):
        # On the fly: the teacher runs beside the student; only its top-k log-probs reach the loss.
        _, (v, ix) = teacher_topk_on_the_fly(x)
        return fused(model, x, amp, v, ix, "renorm", "logprobs")[0]

    def kd_tail(step, x, model, amp):
        # Offline: read the cached log-probs; the teacher's mass outside the top-k is the tail bucket.
        return fused(model, x, amp, *cached_topk(step), "tail", "logprobs")[0]

    def kd_sinkd(step, x, model, amp):
        # SinKD at token level: per sequence, an L x L entropic OT problem between the student's and the
        # teacher's next-token distributions (T = 2, eps = 0.1, 20 iterations, weight 0.001 as published),
        # on top of the cached top-k KL; both need the full logits here.
        with amp():
            logits = model(x[:, :-1])
        with torch.no_grad(), amp():
            tl = teacher(x[:, :-1])
        v, ix = cached_topk(step)
        ce = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        kd = kdkernels.topk_kl_div(logits, v, ix, values_are="logprobs", mode="tail", temperature=cfg.temperature)
        return ce + cfg.kd_weight * (kd + kdkernels.sinkhorn_kd_loss(logits.float(), tl.float(), weight=0.001))

    def kd_relation(step, x, model, amp):
        # Feature level: the teacher's token-relation graph over its last hidden states (width t_dim)
        # taught to the student's (width s_dim): no projection needed, the graphs are T x T.
        with torch.no_grad(), amp():
            th = teacher.hidden(x[:, :-1])
        loss, hidden = fused(model, x, amp, *cached_topk(step), "tail", "logprobs")
        rel = kdkernels.token_relation_loss(hidden.float(), th.float(), loss="kl", similarity="dot")
        return loss + cfg.kd_weight * rel

    methods = (("CE", "hard labels (CE)", hard_label_loss),
               ("KD renorm", "CE + top-k KL renorm (on the fly, fused)", kd_renorm),
               ("KD tail", "CE + top-k KL tail (offline cache, fused)", kd_tail),
               ("KD+SinKD", "CE + top-k KL tail + SinKD (token-level Sinkhorn)", kd_sinkd),
               ("KD+TRG", "CE + top-k KL tail (fused) + token-relation KL (hidden states)", kd_relation))
    results = []
    # Validation loss on a fixed slice of the validation set, ~8 points per run, for the PNG.
    val_probe = val_data[: min(val_data.shape[0], 64)]
    every = max(1, cfg.s_steps // 8)
    for short, method, kd in methods:
        student = copy.deepcopy(student0).to(device)
        points = []
        curve = (every, lambda m: math.log(val_perplexity(m, val_probe, device, 64, amp)), points) if a.plot else None
        ms = train(student, train_data, s_order, cfg, device, amp, lr=cfg.s_lr, name=short, loss_fn=kd,
                   quiet=a.quiet, curve=curve)
        ppl = val_perplexity(student, val_data, device, 64, amp)
        log(f"{method}: val ppl {ppl:.2f}")
        results.append(dict(method=method, val_ppl=ppl, ms_per_step=ms, val_loss_curve=points))
        del student

    # Memory pass, after every timing: a few fresh steps of each method (Adam's state included), twice
    # over, keeping the second round so one-time allocations of whichever method runs first don't count.
    if device.type == "cpu":
        release_free_memory(pin=True)
    for _ in range(2):
        for (short, method, kd), r in zip(methods, results):
            student = copy.deepcopy(student0).to(device)
            if device.type == "cpu":
                release_free_memory()
            with PeakMemory(device) as mem:
                train(student, train_data, s_order[:3], cfg, device, amp, lr=cfg.s_lr, name=short, loss_fn=kd,
                      quiet=True)
            r["peak_mib"] = mem.peak_mib
            del student

    shutil.rmtree(cache_dir, ignore_errors=True)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student0.parameters())
    print(f"\nteacher {n_t / 1e6:.2f}M params, val ppl {t_ppl:.2f}; student {n_s / 1e6:.2f}M params, "
          f"{cfg.s_steps} steps x {cfg.batch}x{cfg.seq} tokens; K = {cfg.k} of V = {V}, T = {cfg.temperature}, "
          f"KD weight {cfg.kd_weight}; device {device}\n")
    print(f"| method | student val ppl | ms/step | peak memory, MiB ({mem.label}) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['val_ppl']:.2f} | {r['ms_per_step']:.1f} | {r['peak_mib']:.1f} |")
    base = results[0]["val_ppl"]
    best = min(results[1:], key=lambda r: r["val_ppl"])
    verdict = "helped" if best["val_ppl"] < base else "did NOT help"
    print(f"\ndistillation {verdict}: best KD student ppl {best['val_ppl']:.2f} vs hard labels {base:.2f} "
          f"({100 * (base - best['val_ppl']) / base:+.1f}%); total {time.perf_counter() - t_start:.0f}s")
    if a.plot:
        from ._plot import INSTALL, have_matplotlib, plot_curves

        if have_matplotlib():
            plot_curves({r["method"]: [l for _, l in r["val_loss_curve"]] for r in results}, a.plot,
                        title="student validation loss", x_label="student step", y_label="val loss (nats/token)",
                        xs={r["method"]: [st for st, _ in r["val_loss_curve"]] for r in results})
            print(f"validation loss curves: {os.path.abspath(a.plot)}")
        else:
            print(f"validation loss curves: not drawn, matplotlib is not installed ({INSTALL})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(config=asdict(cfg), device=str(device), teacher_val_ppl=t_ppl, memory=mem.label,
                           results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
