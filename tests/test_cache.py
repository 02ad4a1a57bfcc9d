"""Tests of kdkernels.cache: format round trip, bit-packing, batches for topk_kl_div, crash safety
(SIGKILL mid-build, then resume), corruption and mismatch errors, and the `kdkernels cache` CLI."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import kdkernels
from cache_helpers import BUILD_KW, K, V, CausalTeacher, TokenTeacher, assert_topk_match, sequences
from kdkernels.cache import (CacheCollator, CacheError, TeacherCache, _format, build_cache, id_bits, load_tokens,
                             pack_ids, save_tokens, unpack_ids, verify_cache)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one intra-op thread is fastest and leaves the shared CPU cores to others.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The standard cache (cache_helpers.BUILD_KW), built once; tests that damage it work on a copy."""
    path = str(tmp_path_factory.mktemp("cache") / "c")
    report = build_cache(TokenTeacher(), sequences(), path, **BUILD_KW)
    return path, report


@pytest.fixture
def copy(built, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(built[0], dst)
    return dst


def _shards(path):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)["shards"]


def _expected(teacher, seq, k, T):
    logits = teacher(torch.as_tensor(seq, dtype=torch.long)[None])[0]
    v, i = kdkernels.teacher_topk(logits, k, T, "logprobs")
    return v, i, torch.logsumexp(logits / T, -1)


# --------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("vocab", [2, 3, 255, 256, 257, 1000, 50257, 65536, 65537, 151936, 2**31 - 1])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_pack_roundtrip(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids = rng.integers(0, vocab, size=(33, k))
    ids[0, 0], ids[-1, -1] = 0, vocab - 1  # both ends of the range
    b = id_bits(vocab)
    assert 2 ** b >= vocab > 2 ** (b - 1) or vocab == 2
    packed = pack_ids(ids, b)
    assert packed.dtype == np.uint8 and packed.shape == (33, math.ceil(k * b / 8))
    np.testing.assert_array_equal(unpack_ids(packed, k, b), ids)


def test_id_bits_of_real_vocabularies():
    assert id_bits(50257) == 16 and id_bits(151936) == 18 and id_bits(32000) == 15 and id_bits(128256) == 17
    # the documented bit order: id j at stream bits [j*b, (j+1)*b), least significant bit first
    packed = pack_ids(np.array([[1, 2]]), 3)  # stream 100 010 -> bits 0 and 4 set
    assert packed.tolist() == [[0b00010001]]


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("value_dtype,id_encoding", [("float16", "packed"), ("bfloat16", "int32")])
def test_roundtrip_equals_teacher_topk(tmp_path, value_dtype, id_encoding):
    teacher, seqs, T = TokenTeacher(), sequences(25), 1.5
    report = build_cache(teacher, seqs, str(tmp_path / "c"), k=K, temperature=T, value_dtype=value_dtype,
                         id_encoding=id_encoding, store_lse=True, shard_tokens=120, batch_size=3, batch_tokens=64)
    assert report.num_shards > 2 and report.num_tokens == sum(map(len, seqs))
    cache = TeacherCache(str(tmp_path / "c"), vocab_size=V, k=K, temperature=T)
    assert len(cache) == len(seqs) and cache.num_tokens == report.num_tokens
    np.testing.assert_array_equal(cache.lengths(), [len(s) for s in seqs])
    tol = 2 ** -8 if value_dtype == "float16" else 2 ** -5  # relative rounding of the stored dtype, with margin
    for i, seq in enumerate(seqs):
        v, ids, lse = _expected(teacher, seq, K, T)
        s = cache.sequence(i)
        np.testing.assert_array_equal(s["tokens"], seq)
        np.testing.assert_array_equal(s["ids"], ids.numpy())
        got = torch.from_numpy(np.array(s["values"]))
        got = got.float() if value_dtype == "float16" else got.view(torch.int16).view(torch.bfloat16).float()
        torch.testing.assert_close(got, v, rtol=tol, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(np.array(s["lse"])), lse, rtol=1e-6, atol=1e-6)
    assert cache.verify() == []


def test_awkward_vocab_151936(tmp_path):
    """18-bit ids and int32 token storage (V > 65536) through a real build."""
    vocab = 151936
    teacher = TokenTeacher(vocab=vocab, dim=4)
    seqs = sequences(3, vocab=vocab, lo=2, hi=6, seed=3)
    seqs[0][0] = vocab - 1
    build_cache(teacher, seqs, str(tmp_path / "c"), k=5)
    cache = TeacherCache(str(tmp_path / "c"), vocab_size=vocab, k=5)
    assert cache.config["id_bits"] == 18 and cache.config["token_dtype"] == "int32"
    for i, seq in enumerate(seqs):
        _, ids, _ = _expected(teacher, seq, 5, 1.0)
        np.testing.assert_array_equal(cache.sequence(i)["ids"], ids.numpy())
        np.testing.assert_array_equal(cache.sequence(i)["tokens"], seq)


def test_causal_teacher_right_padding(tmp_path):
    """Sequences of different lengths are batched (right-padded): a causal teacher's positions are unaffected."""
    teacher, seqs = CausalTeacher(), sequences(12, lo=3, hi=30, seed=1)
    build_cache(teacher, seqs, str(tmp_path / "c"), k=K, batch_size=6)
    cache = TeacherCache(str(tmp_path / "c"))
    for i, seq in enumerate(seqs):
        v, ids, _ = _expected(teacher, seq, K, 1.0)
        s = cache.sequence(i)
        assert_topk_match(s["ids"], s["values"], ids.numpy(), v.numpy())


def test_zero_copy_views(built):
    cache = TeacherCache(built[0])
    s = cache.sequence(3)
    for name in ("tokens", "values", "lse"):
        base = s[name]
        while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None:
            base = base.base
        assert isinstance(base, np.memmap), name  # a view of the mapped shard file, not a copy
    assert not s["values"].flags.writeable


def test_pickles_without_copying_the_maps(built):
    import pickle

    cache = TeacherCache(built[0])
    want = cache.sequence(40)
    blob = pickle.dumps(cache)  # e.g. sent to DataLoader workers started with 'spawn'
    assert len(blob) < 20000
    again = pickle.loads(blob)
    got = again.sequence(40)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert isinstance(pickle.loads(pickle.dumps(cache.dataset()))[3]["input_ids"], torch.Tensor)


def test_batches_feed_topk_kl_div(built):
    path, _ = built
    teacher, seqs, T = TokenTeacher(), sequences(), BUILD_KW["temperature"]
    cache = TeacherCache(path, vocab_size=V, k=K, temperature=T)
    b = cache.batch([5, 0, 17])
    n = [len(seqs[i]) for i in (5, 0, 17)]
    L = max(n)
    assert b.input_ids.shape == (3, L) and b.values.shape == (3, L, K) and b.ids.shape == (3, L, K)
    assert b.values.dtype == torch.float16 and b.ids.dtype == torch.int32 and b.lse.shape == (3, L)
    assert b.lengths.tolist() == n and b.mask.sum(1).tolist() == n and b.index.tolist() == [5, 0, 17]
    for r, i in enumerate((5, 0, 17)):
        assert b.input_ids[r, :n[r]].tolist() == list(seqs[i])
        assert b.targets[r, :n[r] - 1].tolist() == list(seqs[i][1:])
        assert (b.targets[r, n[r] - 1:] == -100).all()
    # straight into the fused loss: equals the per-sequence loss with the teacher's own top-k
    z = torch.randn(3, L, V, dtype=torch.float64, requires_grad=True)
    loss = kdkernels.topk_kl_div(z, b.values, b.ids, values_are="logprobs", temperature=T, mode="tail",
                                 mask=b.mask, reduction="sum")
    want = 0.0
    for r, i in enumerate((5, 0, 17)):
        v, ids, _ = _expected(teacher, seqs[i], K, T)
        want = want + kdkernels.topk_kl_div(z[r, :n[r]], v.half().double(), ids, values_are="logprobs",
                                            temperature=T, mode="tail", reduction="sum")
    torch.testing.assert_close(loss, want)
    loss.backward()
    pad = ~b.mask
    assert (z.grad[pad] == 0).all()  # padding contributes nothing
    # iteration: every sequence once, deterministic shuffles
    seen = [int(i) for batch in cache.batches(7, shuffle=True, seed=3) for i in batch.index]
    assert sorted(seen) == list(range(len(cache)))
    again = [int(i) for batch in cache.batches(7, shuffle=True, seed=3) for i in batch.index]
    assert seen == again
    assert sum(1 for _ in cache.batches(7, drop_last=True)) == len(cache) // 7


def test_dataset_and_collator(built):
    cache = TeacherCache(built[0])
    ds = cache.dataset()
    items = [ds[2], ds[9]]
    out = CacheCollator(cache, pad_id=7)(items)
    assert set(out) == {"input_ids", "attention_mask", "labels", "teacher_values", "teacher_ids", "teacher_lse"}
    n = len(items[0]["input_ids"])
    assert out["labels"][0, :n].tolist() == items[0]["input_ids"].tolist()
    bad = dict(items[1], input_ids=items[1]["input_ids"].clone())
    bad["input_ids"][0] += 1
    with pytest.raises(CacheError, match=r"the input_ids of cache_index 9 differ from the tokens cached"):
        CacheCollator(cache)([items[0], bad])
    with pytest.raises(CacheError, match=r"every item needs a 'cache_index'"):
        CacheCollator(cache)([{"input_ids": [1, 2]}])
    long = next(ds[i] for i in range(len(ds)) if len(ds[i]["input_ids"]) >= 3)
    prompt = dict(long, labels=[-100] * 2 + long["input_ids"][2:].tolist())  # e.g. a masked prompt
    assert CacheCollator(cache)([prompt])["labels"][0, :3].tolist() == [-100, -100, int(long["input_ids"][2])]


# ------------------------------------------------------------------------------------------- crash safety
def _script(out, *extra):
    import kdkernels as k

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(k.__file__)), HERE]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "cache_helpers.py"), out, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _same_cache(a, b):
    sa, sb = _shards(a), _shards(b)
    assert [s["files"] for s in sa] == [s["files"] for s in sb]  # same bytes: sizes and checksums of every file
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))


def test_sigkill_mid_build_then_resume(built, tmp_path):
    """SIGKILL a real build once it has committed a shard, then resume: same bytes as an uninterrupted build."""
    out = str(tmp_path / "c")
    proc = _script(out, "--delay", "0.15")
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the build ended before it could be killed: {proc.communicate()[1].decode()[-2000:]}")
            try:
                if len(_shards(out)) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("no shard was committed in 60 s")
        time.sleep(0.2)  # land somewhere inside the next shard's work
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # what a killed build leaves is readable as an incomplete cache, never as a complete one
    with pytest.raises(CacheError, match="the build is incomplete"):
        TeacherCache(out)
    partial = TeacherCache(out, allow_incomplete=True)
    assert 1 <= partial.num_shards < built[1].num_shards
    for i in range(len(partial)):
        partial.sequence(i)  # every committed shard passes its checksum
    report = build_cache(TokenTeacher(), sequences(), out, **BUILD_KW)
    assert report.resumed_shards >= 1 and report.built_tokens < report.num_tokens
    _same_cache(out, built[0])
    assert verify_cache(out) == []


def test_sigkill_between_rename_and_index(built, tmp_path):
    """The worst moment: a shard directory renamed into place but not yet in the index."""
    out = str(tmp_path / "c")
    proc = _script(out, "--kill-at", "shard_renamed")
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert os.path.isdir(os.path.join(out, "shard-00000")) and _shards(out) == []
    assert any("shard-00000" in p and "leftovers" in p for p in verify_cache(out))
    build_cache(TokenTeacher(), sequences(), out, **BUILD_KW)
    _same_cache(out, built[0])


class _Crash(Exception):
    pass


@pytest.mark.parametrize("point,nth", [("mid_file", 1), ("mid_file", 12), ("shard_written", 2),
                                       ("shard_renamed", 3), ("index_tmp_written", 1), ("index_tmp_written", 3),
                                       ("index_written", 2)])
def test_crash_points_then_resume(built, tmp_path, monkeypatch, point, nth):
    """Stop the build (as a crash would: no cleanup) at the nth pass through each critical point; resume."""
    out = str(tmp_path / "c")
    seen = []

    def hook(p):
        if p == point:
            seen.append(p)
            if len(seen) == nth:
                raise _Crash(p)

    monkeypatch.setattr(_format, "_fault_hook", hook)
    with pytest.raises(_Crash):
        build_cache(TokenTeacher(), sequences(), out, **BUILD_KW)
    monkeypatch.setattr(_format, "_fault_hook", lambda p: None)
    committed = _shards(out) if os.path.exists(os.path.join(out, "index.json")) else []  # none: crashed creating it
    if committed:
        part = TeacherCache(out, allow_incomplete=True, check="full")  # whatever is listed is whole
        assert part.num_shards == len(committed)
    build_cache(TokenTeacher(), sequences(), out, **BUILD_KW)
    _same_cache(out, built[0])
    assert verify_cache(out) == []


def test_resume_complete_is_noop_and_settings_must_match(built, copy):
    report = build_cache(TokenTeacher(), sequences(), copy, **BUILD_KW)
    assert report.built_tokens == 0 and report.resumed_shards == report.num_shards
    index = os.path.join(copy, "index.json")
    with pytest.raises(CacheError, match=re.escape(f"kdkernels.cache: {index} was started with other settings: "
                                                   "k 8 (cache) != 9 (this build)")):
        build_cache(TokenTeacher(), sequences(), copy, **dict(BUILD_KW, k=9))
    with pytest.raises(CacheError, match=r"dataset_hash '[0-9a-f]+' \(cache\) != '[0-9a-f]+' \(this build\)"):
        build_cache(TokenTeacher(), sequences(seed=5), copy, **BUILD_KW)


def test_one_build_at_a_time(tmp_path):
    from kdkernels.cache.build import _BuildLock

    out = str(tmp_path / "c")
    os.makedirs(out)
    with _BuildLock(out):  # as if another process were building into it
        with pytest.raises(CacheError, match=re.escape(f"another build is writing {out} (it holds {out}/.lock)")):
            build_cache(TokenTeacher(), sequences(3), out, k=2)
    build_cache(TokenTeacher(), sequences(3), out, k=2)  # released: fine


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"is not empty and holds no index.json: refusing"):
        build_cache(TokenTeacher(), sequences(3), str(tmp_path), k=2)


def test_build_checks_teacher_output(tmp_path):
    with pytest.raises(CacheError, match=re.escape("the teacher returned logits of shape (1, 5, 1000) for input ids "
                                                   "of shape (1, 5); expected (1, 5, 999) (vocab_size 999)")):
        build_cache(TokenTeacher(), [[1, 2, 3, 4, 5]], str(tmp_path / "c"), k=2, vocab_size=999)
    with pytest.raises(CacheError, match=r"token id 1000 is outside the teacher's vocabulary \[0, 1000\)"):
        build_cache(TokenTeacher(), [[1, 1000]], str(tmp_path / "d"), k=2)


# --------------------------------------------------------------------------------------- bad caches
def test_wrong_vocab_k_tokenizer_temperature(copy):
    index = os.path.join(copy, "index.json")
    cases = [(dict(vocab_size=V + 1), f"vocab_size {V}, but this run asks for {V + 1}"),
             (dict(k=K * 2), f"k {K}, but this run asks for {K * 2}"),
             (dict(tokenizer_hash="abc"), "tokenizer_hash None, but this run asks for 'abc'"),
             (dict(temperature=1.0), "temperature 1.5, but this run asks for 1.0")]
    for kwargs, tail in cases:
        with pytest.raises(CacheError) as e:
            TeacherCache(copy, **kwargs)
        assert str(e.value) == f"kdkernels.cache: {index} was built for {tail}"


def test_wrong_tokenizer_hash(tmp_path):
    build_cache(TokenTeacher(), sequences(3), str(tmp_path / "c"), k=2, tokenizer_hash="aa11")
    TeacherCache(str(tmp_path / "c"), tokenizer_hash="aa11")
    with pytest.raises(CacheError, match=re.escape("built for tokenizer_hash 'aa11', but this run asks for 'bb22'")):
        TeacherCache(str(tmp_path / "c"), tokenizer_hash="bb22")


def test_missing_index(copy, tmp_path):
    os.remove(os.path.join(copy, "index.json"))
    with pytest.raises(CacheError) as e:
        TeacherCache(copy)
    assert str(e.value) == (f"kdkernels.cache: missing index {os.path.join(copy, 'index.json')}: not a teacher cache, "
                            "or its build never started (run `kdkernels cache build` into this directory)")
    with pytest.raises(CacheError, match="the directory does not exist"):
        TeacherCache(str(tmp_path / "nowhere"))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("fname,offset", [("values.npy", -7), ("ids.npy", 200), ("values.npy", 20),
                                          ("offsets.npy", -1), ("tokens.npy", -3), ("lse.npy", -2)])
def test_bit_flip_detected(copy, fname, offset):
    shard = _shards(copy)[1]
    f = os.path.join(copy, shard["name"], fname)
    _flip(f, offset if offset >= 0 else os.path.getsize(f) + offset)
    cache = TeacherCache(copy)  # sizes are intact: opening is cheap and succeeds
    cache.sequence(0)  # shard 0 is fine
    with pytest.raises(CacheError) as e:
        cache.sequence(shard["first_sequence"])  # first read of the damaged shard hashes it
    want = shard["files"][fname]["blake2b"]
    assert re.fullmatch(re.escape(f"kdkernels.cache: checksum mismatch in shard file {f}: expected blake2b {want}, "
                                  "got ") + "[0-9a-f]{32}" + re.escape("; the file is corrupt, rebuild the cache"),
                        str(e.value))
    problems = verify_cache(copy)
    assert len(problems) == 1 and f in problems[0]
    with pytest.raises(CacheError, match="checksum mismatch"):
        TeacherCache(copy, check="full")


def test_truncated_or_missing_shard_file(copy):
    shard = _shards(copy)[2]
    f = os.path.join(copy, shard["name"], "ids.npy")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 5)
    with pytest.raises(CacheError) as e:
        TeacherCache(copy)
    assert str(e.value) == (f"kdkernels.cache: shard file {f} is truncated or altered: expected {size} bytes, found "
                            f"{size - 5}; rebuild the cache (`kdkernels cache verify` checks every shard)")
    assert any(f in p and "truncated" in p for p in verify_cache(copy))
    os.remove(f)
    with pytest.raises(CacheError, match=re.escape(f"shard file {f} is missing (the index lists it)")):
        TeacherCache(copy)


# ------------------------------------------------------------------------------------------ token files
def test_token_files(tmp_path):
    seqs = sequences(5)
    data = save_tokens(str(tmp_path / "t.npy"), str(tmp_path / "l.npy"), seqs)
    loaded = load_tokens(str(tmp_path / "t.npy"), str(tmp_path / "l.npy"))
    assert isinstance(loaded.tokens, np.memmap) and loaded.fingerprint() == data.fingerprint()
    np.savez(tmp_path / "d.npz", tokens=data.tokens, lengths=data.lengths)
    assert load_tokens(str(tmp_path / "d.npz")).fingerprint() == data.fingerprint()
    np.save(tmp_path / "fixed.npy", np.arange(12).reshape(3, 4))
    fixed = load_tokens(str(tmp_path / "fixed.npy"))
    assert len(fixed) == 3 and fixed[2].tolist() == [8, 9, 10, 11]
    with pytest.raises(CacheError, match=r"is 1-D \(concatenated sequences\): the lengths file is required"):
        load_tokens(str(tmp_path / "t.npy"))
    np.save(tmp_path / "badl.npy", np.array([1, 2]))
    with pytest.raises(CacheError, match=r"the lengths add up to 3 tokens but the token array holds"):
        load_tokens(str(tmp_path / "t.npy"), str(tmp_path / "badl.npy"))


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_build_inspect_verify(tmp_path, capsys):
    from kdkernels.__main__ import main

    teacher_file = str(tmp_path / "teacher.pt")
    torch.save(TokenTeacher(), teacher_file)
    save_tokens(str(tmp_path / "tokens.npy"), str(tmp_path / "lengths.npy"), sequences(20))
    out = str(tmp_path / "cache")
    argv = ["cache", "build", "--teacher", teacher_file, "--tokens", str(tmp_path / "tokens.npy"), "--lengths",
            str(tmp_path / "lengths.npy"), "--out", out, "--k", "8", "--temperature", "2", "--lse",
            "--shard-tokens", "100", "--device", "cpu"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert re.search(r"built [\d,]+ tokens in [\d.]+ s: [\d,]+ tokens/s", cap.out)
    assert re.search(r"\d+ shards, 20 sequences, [\d,]+ tokens, [\d,]+ bytes, [\d.]+ bytes/token \(V=1000, k=8\)",
                     cap.out)
    assert "build:" in cap.err  # progress lines (not a terminal: one per tenth of the work)
    assert main(argv) == 0 and "resumed:" in capsys.readouterr().out
    assert main(["cache", "inspect", out, "--shards"]) == 0
    text = capsys.readouterr().out
    for field in ("shards", "tokens", "bytes_per_token", "k ", "vocab_size", "temperature", "float16 log-probs at "
                  "temperature 2.0", "packed, 10 bits", "shard-00000"):
        assert field in text, field
    assert main(["cache", "inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["k"] == 8 and info["vocab_size"] == 1000 and info["complete"] and info["sequences"] == 20
    assert main(["cache", "verify", out]) == 0 and "OK:" in capsys.readouterr().out
    f = os.path.join(out, "shard-00001", "values.npy")
    _flip(f, os.path.getsize(f) - 1)
    assert main(["cache", "verify", out, "--quiet"]) == 1
    cap = capsys.readouterr()
    assert "FAILED: 1 problem(s)" in cap.out and f"checksum mismatch in shard file {f}" in cap.err
    assert main(["cache", "inspect", str(tmp_path)]) == 1
    assert "missing index" in capsys.readouterr().err


def test_cli_help_reads_well(capsys):
    from kdkernels.__main__ import main

    with pytest.raises(SystemExit):
        main(["cache", "build", "--help"])
    text = capsys.readouterr().out
    assert "--teacher PATH" in text and "Running the same command again resumes" in text and "lengths.npy" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "cache" in text and "info" in text and "bench" in text
