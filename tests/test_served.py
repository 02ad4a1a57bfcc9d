"""A teacher behind an OpenAI-compatible server (kdkernels.cache.ServedTeacher, vLLM's prompt_logprobs): the
cache it builds equals the in-process teacher's to float16 rounding; retries, refusals."""
import numpy as np
import pytest
import torch

from _served_stub import serve
from cache_helpers import V, TokenTeacher, assert_topk_match, sequences
from kdkernels.cache import CacheError, ServedTeacher, TeacherCache, build_cache

K = 8
KW = dict(k=K, temperature=1.0, shard_tokens=300, batch_size=4, batch_tokens=160)


@pytest.fixture
def server():
    srv, url = serve(TokenTeacher(), max_logprobs=20, fail_first=1)  # the first request gets a 503
    yield srv, url
    srv.shutdown()


def test_served_cache_equals_in_process(server, tmp_path):
    srv, url = server
    seqs = sequences(n=25)
    build_cache(ServedTeacher(url, "tiny", vocab_size=V, batch_size=3, backoff=0.01), seqs, str(tmp_path / "s"),
                **KW)
    assert srv.state["requests"] > 1  # the 503 was retried
    build_cache(TokenTeacher(), seqs, str(tmp_path / "p"), **KW)
    served, local = TeacherCache(str(tmp_path / "s")), TeacherCache(str(tmp_path / "p"))
    assert len(served) == len(local) == 25
    for i in range(25):
        a, b = served.sequence(i), local.sequence(i)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        assert_topk_match(a["ids"], a["values"], b["ids"], b["values"])


def test_served_refusals(server, tmp_path):
    _, url = server
    seqs = sequences(n=3)
    with pytest.raises(CacheError, match=r"outside the vocabulary \[0, 500\) at .*: is vocab_size"):
        build_cache(ServedTeacher(url, "tiny", vocab_size=500, backoff=0.01), sequences(n=3, vocab=500),
                    str(tmp_path / "a"), **KW)  # the data fits 500, the served model's ids do not
    with pytest.raises(CacheError, match="fewer than k = 30: raise the server's limit"):
        build_cache(ServedTeacher(url, "tiny", vocab_size=V, backoff=0.01), seqs, str(tmp_path / "b"),
                    **dict(KW, k=30))
    with pytest.raises(ValueError, match="temperature 1.0 without store_lse only"):
        build_cache(ServedTeacher(url, "tiny", vocab_size=V), seqs, str(tmp_path / "c"), **dict(KW, temperature=2.0))
    with pytest.raises(CacheError, match="did not answer after 2 attempts"):
        build_cache(ServedTeacher("http://127.0.0.1:9/v1", "tiny", vocab_size=V, retries=1, backoff=0.01,
                                  timeout=2), seqs, str(tmp_path / "d"), **KW)
