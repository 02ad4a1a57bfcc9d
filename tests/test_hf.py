"""End-to-end tests of kdkernels.integrations.hf.DistillationTrainer on tiny random models built from
configs (no downloads): a live teacher, a teacher cache, gradient accumulation, a resumed run."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import kdkernels  # noqa: E402
from cache_helpers import assert_topk_match  # noqa: E402
from kdkernels.cache import TeacherCache, build_cache  # noqa: E402
from kdkernels.integrations.hf import CONFIG_NAME, DistillationTrainer, PadCollator, shift_labels  # noqa: E402
from utils import PEAK_RSS  # noqa: E402

V = 67  # an odd vocabulary


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(n)


def student(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def teacher(seed=1, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V, size=int(rng.integers(3, 21))).tolist() for _ in range(n)]


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def loss_fn(mode="tail"):
    return kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": mode,
                                                                   "k": 8, "temperature": 1.0}})


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def train(out, dataset, **kw):
    extra = {k: kw.pop(k) for k in ("teacher", "teacher_cache", "resume") if k in kw}
    model = kw.pop("model", None) or student()
    tr = DistillationTrainer(model=model, args=args(out, **kw.pop("args", {})), train_dataset=dataset,
                             loss=kw.pop("loss", None) or loss_fn(), teacher=extra.get("teacher"),
                             teacher_cache=extra.get("teacher_cache"), **kw)
    tr.train(resume_from_checkpoint=extra.get("resume"))
    return tr


def test_live_teacher_gradient_accumulation_equals_full_batch(tmp_path):
    """batch 4 x 1 step == batch 2 x 2 accumulated steps (variable lengths: needs one global token count)."""
    ds = [{"input_ids": s} for s in data()]
    t = teacher()
    t_before = params(t)
    full = train(tmp_path / "a", ds, teacher=t)
    accum = train(tmp_path / "b", ds, teacher=t, args=dict(per_device_train_batch_size=2,
                                                           gradient_accumulation_steps=2))
    assert_same_params(params(full.model), params(accum.model), rtol=1e-5, atol=1e-6)
    assert not torch.equal(params(full.model)["lm_head.weight"], params(student())["lm_head.weight"])  # it trained
    assert_same_params(params(t), t_before, rtol=0, atol=0)  # the teacher is a constant
    assert all(p.grad is None for p in t.parameters())
    logs = [h for h in full.state.log_history if "loss" in h]
    logs_acc = [h for h in accum.state.log_history if "loss" in h]
    assert len(logs) == 2 and {"loss_ce", "loss_kd"} <= set(logs[0])
    for a, b in zip(logs, logs_acc):  # the logged loss is the full batch's, however it was accumulated
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss"] == pytest.approx(0.5 * a["loss_ce"] + 0.5 * a["loss_kd"], rel=1e-4)
        assert a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-4)
    metrics = full.evaluate(eval_dataset=ds[:5])
    assert np.isfinite(metrics["eval_loss"])


def test_teacher_cache_trains_like_the_live_teacher(tmp_path):
    """A cache of the teacher's top-k (float16 log-probs) trains the student as the live teacher does."""
    seqs = data()
    t = teacher()
    report = build_cache(t, seqs, str(tmp_path / "cache"), k=8, temperature=1.0, batch_size=5)
    assert report.num_tokens == sum(map(len, seqs))
    cache = TeacherCache(str(tmp_path / "cache"), vocab_size=V, k=8)
    live = train(tmp_path / "live", [{"input_ids": s} for s in seqs], teacher=t)
    cached = train(tmp_path / "cached", cache.dataset(), teacher_cache=cache)
    assert_same_params(params(live.model), params(cached.model), rtol=1e-3, atol=1e-4)
    # a path works too, and the batch carries the cached top-k
    tr = DistillationTrainer(model=student(), args=args(tmp_path / "p"), train_dataset=cache.dataset(),
                             loss=loss_fn(), teacher_cache=str(tmp_path / "cache"))
    batch = tr.data_collator([cache.dataset()[i] for i in (0, 3)])
    assert batch["teacher_values"].shape[-1] == 8 and batch["teacher_values"].dtype == torch.float16


@pytest.mark.parametrize("fused", [True, False])
def test_served_teacher_trains_like_the_live_teacher(tmp_path, fused):
    """A teacher behind an OpenAI-compatible server (a stub serving the same model's real top-k) trains the
    student as the live teacher does, on the fused and the logits paths."""
    from _served_stub import serve
    from kdkernels.cache import ServedTeacher

    seqs = data()
    t = teacher()
    srv, url = serve(t)
    try:
        served = train(tmp_path / "served", [{"input_ids": s} for s in seqs],
                       teacher=ServedTeacher(url, "gpt2-tiny", vocab_size=V, batch_size=3), fused=fused)
    finally:
        srv.shutdown()
    live = train(tmp_path / "live", [{"input_ids": s} for s in seqs], teacher=t, fused=fused)
    assert_same_params(params(live.model), params(served.model), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="a served teacher gives top-k log-probs only"):
        DistillationTrainer(model=student(), args=args(tmp_path / "x"), train_dataset=[{"input_ids": seqs[0]}],
                            loss=loss_fn("dense"), teacher=ServedTeacher(url, "m", vocab_size=V))


def test_resumed_run_matches_uninterrupted(tmp_path):
    seqs = data()
    build_cache(teacher(), seqs, str(tmp_path / "cache"), k=8)
    cache = TeacherCache(str(tmp_path / "cache"), vocab_size=V)
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_strategy="steps",
              save_steps=2)
    whole = train(tmp_path / "whole", cache.dataset(), teacher_cache=cache, args=kw)
    ckpt = tmp_path / "whole" / "checkpoint-2"
    assert (ckpt / CONFIG_NAME).exists()
    saved = json.loads((ckpt / CONFIG_NAME).read_text())
    assert saved["loss"]["terms"]["kd"]["mode"] == "tail" and saved["kdkernels_teacher"]["k"] == 8
    resumed = train(tmp_path / "resumed", cache.dataset(), teacher_cache=cache, args=kw, model=student(seed=5),
                    resume=str(ckpt))
    assert resumed.state.global_step == 4
    assert_same_params(params(whole.model), params(resumed.model), rtol=1e-5, atol=1e-6)


def test_hidden_state_terms_get_both_models_hidden_states(tmp_path):
    seen = []

    class Feature:
        needs_hidden_states = True

        def __call__(self, x):
            seen.append((x.student_hidden_states[-1].shape, x.teacher.hidden_states[-1].shape))
            return (x.student_hidden_states[-1].pow(2).mean(-1) * x.mask).sum() / x.num_items

    loss = kdkernels.DistillationLoss(ce_weight=1.0, terms={"feat": {"fn": Feature(), "weight": 0.01}})
    tr = train(tmp_path, [{"input_ids": s} for s in data(4)], teacher=teacher(), loss=loss, args=dict(max_steps=1))
    (s_shape, t_shape), = seen
    assert s_shape[-1] == 16 and t_shape[-1] == 32 and s_shape[:2] == t_shape[:2]
    assert "loss_feat" in tr.state.log_history[0]


def test_cli_builds_from_a_hugging_face_directory(tmp_path, capsys):
    from kdkernels.__main__ import main

    t = teacher()
    t.save_pretrained(str(tmp_path / "teacher"))
    kdkernels.cache.save_tokens(str(tmp_path / "t.npy"), str(tmp_path / "l.npy"), data(6))
    argv = ["cache", "build", "--teacher", str(tmp_path / "teacher"), "--tokens", str(tmp_path / "t.npy"),
            "--lengths", str(tmp_path / "l.npy"), "--out", str(tmp_path / "c"), "--k", "5", "--device", "cpu",
            "--quiet"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "tokens/s" in cap.out and "bytes/token (V=67, k=5)" in cap.out
    assert "no tokenizer found" in cap.err  # none saved: no (meaningless) tokenizer hash is recorded
    cache = TeacherCache(str(tmp_path / "c"), vocab_size=V, k=5)
    assert cache.tokenizer_hash is None
    seq = data(6)[2]
    with torch.no_grad():
        v, i = kdkernels.teacher_topk(t(torch.tensor([seq])).logits[0], 5)
    assert_topk_match(cache.sequence(2)["ids"], cache.sequence(2)["values"], i.numpy(), v.numpy())


def test_collators_and_shift():
    out = PadCollator(pad_id=9)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert shift_labels(out["labels"]).tolist() == [[6, 7, -100], [-100, -100, -100]]


def test_refusals(tmp_path):
    ds = [{"input_ids": s} for s in data(4)]
    with pytest.raises(ValueError, match=r"the loss has distillation terms \['kd'\]: pass teacher="):
        DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=loss_fn())
    with pytest.raises(ValueError, match="the teacher's vocabulary has 71 entries and the student's 67"):
        DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=loss_fn(),
                            teacher=teacher(vocab=71))
    with pytest.raises(TypeError, match="loss must be a kdkernels.DistillationLoss"):
        DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=None, teacher=teacher())
    with pytest.raises(ValueError, match=r"label_smoothing_factor would be ignored .* DistillationLoss\(label_smo"):
        DistillationTrainer(model=student(), args=args(tmp_path, label_smoothing_factor=0.1), train_dataset=ds,
                            loss=loss_fn(), teacher=teacher())
    build_cache(teacher(vocab=71), [[3, 4, 5]], str(tmp_path / "c71"), k=4)
    with pytest.raises(ValueError, match=r"teacher cache .*c71.index.json's vocabulary has 71 entries and the "
                                         r"student's 67: pass DistillationLoss\(teacher_vocab='truncate'\)"):
        DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=loss_fn(),
                            teacher_cache=str(tmp_path / "c71"))
    pad = kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "k": 4}},
                                    teacher_vocab="pad")
    with pytest.raises(ValueError, match=r"has 71 entries and the student's 67 \(teacher_vocab='pad' does not fit: "
                                         r"the teacher's is the larger\)"):
        DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=pad, teacher=teacher(vocab=71))
    # hard labels only: no teacher needed
    tr = train(tmp_path / "ce", ds, loss=kdkernels.DistillationLoss(ce_weight=1.0, terms={}), args=dict(max_steps=1))
    assert "loss_ce" in tr.state.log_history[0]


# ---------------------------------------------------------------------------------------------
# The fused path: the student's last hidden state and its lm_head, never the (N, V) logits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["live", "cache"])
def test_fused_path_trains_like_the_logits_path(tmp_path, source):
    seqs = data()
    kw = dict(teacher=teacher()) if source == "live" else {}
    if source == "cache":
        build_cache(teacher(), seqs, str(tmp_path / "cache"), k=8, temperature=1.0, batch_size=5)
        cache = TeacherCache(str(tmp_path / "cache"), vocab_size=V, k=8)
        ds, kw = cache.dataset(), dict(teacher_cache=cache)
    else:
        ds = [{"input_ids": s} for s in seqs]
    fused = train(tmp_path / "f", ds, args=dict(gradient_accumulation_steps=2, per_device_train_batch_size=2), **kw)
    plain = train(tmp_path / "p", ds, args=dict(gradient_accumulation_steps=2, per_device_train_batch_size=2),
                  fused=False, **kw)
    assert fused.fused_reason is None and plain.fused_reason == "fused=False"
    assert_same_params(params(fused.model), params(plain.model), rtol=1e-4, atol=1e-5)
    for a, b in zip([h for h in fused.state.log_history if "loss" in h], [h for h in plain.state.log_history if "loss" in h]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-4)
        assert a["loss_ce"] == pytest.approx(b["loss_ce"], rel=1e-4)
        assert 0 <= a["top1_agreement"] <= 1 and 0 < a["student_topk_mass"] <= 1 and 0 < a["teacher_topk_mass"] <= 1


@pytest.mark.parametrize("source", ["live", "cache"])
def test_vocabularies_of_different_sizes(tmp_path, source):
    """A teacher of 71 entries, a student table of 67 rows of which 60 are real (valid_vocab): the teacher's
    top-k ids at or above 60 are dropped into its tail; the fused and the logits paths agree."""
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 60, size=int(rng.integers(3, 21))).tolist() for _ in range(12)]
    big = teacher(vocab=71)
    loss = lambda: kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": "tail",
                                                                           "k": 8}},
                                              valid_vocab=60, teacher_vocab="truncate")
    if source == "cache":
        build_cache(big, seqs, str(tmp_path / "cache"), k=8, batch_size=5)
        cache = TeacherCache(str(tmp_path / "cache"), k=8)
        assert cache.vocab_size == 71
        ids = torch.cat([torch.from_numpy(np.asarray(cache.sequence(i)["ids"], dtype=np.int64)).flatten()
                         for i in range(len(cache))])
        assert bool((ids >= 60).any())  # the cut is exercised: some teacher top-k ids are beyond the student's
        ds, kw = cache.dataset(), dict(teacher_cache=cache)
    else:
        ds, kw = [{"input_ids": s} for s in seqs], dict(teacher=big)
    fused = train(tmp_path / "f", ds, loss=loss(), **kw)
    plain = train(tmp_path / "p", ds, loss=loss(), fused=False, **kw)
    assert fused.fused_reason is None
    assert_same_params(params(fused.model), params(plain.model), rtol=1e-4, atol=1e-5)
    for a, b in zip([h for h in fused.state.log_history if "loss" in h],
                    [h for h in plain.state.log_history if "loss" in h]):
        assert np.isfinite(a["loss"]) and a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-4)
        assert a["loss_ce"] == pytest.approx(b["loss_ce"], rel=1e-4)
    # the padded rows 60..66 took no part: no gradient reached them
    s0 = student()
    for tr in (fused, plain):
        torch.testing.assert_close(tr.model.lm_head.weight[60:], s0.lm_head.weight[60:], rtol=0, atol=0)


def _gemma(seed=0, cap=5.0):
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=cap,
                                    attn_logit_softcapping=None, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits large enough for the cap to bite
        m.get_output_embeddings().weight.mul_(40.0)
    return m


def test_gemma2_softcap_applied_in_the_fused_path(tmp_path):
    ds = [{"input_ids": s} for s in data(8)]
    fused = train(tmp_path / "f", ds, model=_gemma(), teacher=teacher())
    plain = train(tmp_path / "p", ds, model=_gemma(), teacher=teacher(), fused=False)  # HF's .logits are capped
    uncapped = train(tmp_path / "u", ds, model=_gemma(cap=None), teacher=teacher())
    assert fused.fused_reason is None
    assert_same_params(params(fused.model), params(plain.model), rtol=1e-4, atol=1e-5)
    lf = [h["loss"] for h in fused.state.log_history if "loss" in h]
    lu = [h["loss"] for h in uncapped.state.log_history if "loss" in h]
    assert abs(lf[0] - lu[0]) > 1e-3 * abs(lu[0])  # the cap changes the loss: it was applied, not ignored


def test_fused_path_falls_back_and_says_why(tmp_path, caplog):
    ds = [{"input_ids": s} for s in data(4)]
    loss = kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": "dense"}})
    tr = DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=ds, loss=loss, teacher=teacher())
    assert tr.fused_reason == "term 'kd' has mode='dense', which needs the teacher's full logits"

    class Odd(torch.nn.Module):
        config = type("C", (), {"output_logits_scaling": 2.0})()
    with pytest.raises(ValueError, match="output_logits_scaling = 2.0, a final-logit transform the fused path cannot"):
        kdkernels.integrations.hf.logit_map_of(Odd())


_TRAINER_MEMORY_SCRIPT = r"""
import json, os, sys, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, kdkernels
from kdkernels.integrations.hf import DistillationTrainer
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
V, H, B, L = 65536, 256, 4, 1024                 # N = 4096 tokens: the (N, V) float32 logits are 1.07 GB
def model(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)
student, teacher = model(0), model(1)
loss = kdkernels.DistillationLoss(ce_weight=0.5, terms={"kd": {"fn": "topk_kl", "weight": 0.5, "mode": "tail", "k": 32}})
args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=B, disable_tqdm=True)
tr = DistillationTrainer(model=student, args=args, loss=loss, teacher=teacher, fused=sys.argv[1] == "fused",
                         train_dataset=[{"input_ids": [3] * L}])
g = torch.Generator().manual_seed(0)
batch = tr.data_collator([{"input_ids": torch.randint(3, V, (L,), generator=g).tolist()} for _ in range(B)])
base = reset_peak()
student.train()
out = tr.compute_loss(student, batch)
out.backward()
grads = {n: p.grad.double().norm().item() for n, p in student.named_parameters() if p.grad is not None}
print(json.dumps({"peak_extra": rss("VmHWM:") - base, "loss": out.item(), "grads": grads}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_fused_trainer_step_memory():
    """A step at V = 65536, N = 4096, H = 256 (float32, CPU): the fused step's peak memory above its start is at
    most 0.35x the logits step's, with the same loss and gradients."""
    import subprocess
    import sys
    out = {}
    for path in ("fused", "logits"):
        res = subprocess.run([sys.executable, "-c", PEAK_RSS + _TRAINER_MEMORY_SCRIPT, path], capture_output=True,
                             text=True,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        out[path] = json.loads(res.stdout.strip().splitlines()[-1])
    f, p = out["fused"], out["logits"]
    print(f"trainer step peak memory above start: fused {f['peak_extra'] / 2**20:.0f} MiB, "
          f"logits {p['peak_extra'] / 2**20:.0f} MiB ({f['peak_extra'] / p['peak_extra']:.2f}x)")
    assert f["loss"] == pytest.approx(p["loss"], rel=1e-5)
    for name, v in p["grads"].items():
        assert f["grads"][name] == pytest.approx(v, rel=1e-4), name
    assert p["peak_extra"] > 2 << 30, out  # the logits step really holds several (N, V) float32 tensors
    assert f["peak_extra"] <= 0.35 * p["peak_extra"], out


def test_fused_path_under_bf16_autocast(tmp_path):
    """TrainingArguments(bf16=True): autocast around float32 parameters, as most people train."""
    ds = [{"input_ids": s} for s in data(8)]
    tr = train(tmp_path, ds, teacher=teacher(), args=dict(bf16=True))
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert tr.fused_reason is None and len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    assert not torch.equal(params(tr.model)["lm_head.weight"], params(student())["lm_head.weight"])


@pytest.mark.parametrize("fused,accum", [(True, 1), (True, 2), (False, 1)])
def test_ddp_two_processes_train_like_one(tmp_path, fused, accum):
    """torchrun, 2 gloo processes x batch 2 (or 1 x 2 accumulation steps) == one process x batch 4: the same
    weights, so num_items_in_batch is summed over processes and DDP's averaging undone exactly once."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # torchrun's --master-port 0 would hang: pick a free one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           os.path.join(os.path.dirname(__file__), "_ddp_trainer.py"), str(tmp_path / "ddp"),
           "fused" if fused else "logits", str(accum)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "ddp" / "result.pt")
    assert got["fused_reason"] == (None if fused else "fused=False")
    one = train(tmp_path / "one", [{"input_ids": s} for s in data()], teacher=teacher(), fused=fused)
    assert_same_params(got["params"], params(one.model), rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["params"]["lm_head.weight"], params(student())["lm_head.weight"])
    for a, b in zip(got["logs"], [x for x in one.state.log_history if "loss" in x]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
